"""Graph tokens vs none on the simulated soft arm: the experiment of the README's "Simulated soft
arm" section, from simulation to the results table.

    python scripts/soft_arm_graph_ablation.py            # or: make soft-arm-ablation

1. simulate `--episodes` scripted-expert demonstrations (data_prep/simulate_soft_arm.py, seed 0)
   and convert them into a LeRobotDataset (data_prep/soft_arm_to_lerobot.py);
2. train the tiny pi0 with `scripts/train_soft_arm.py --config configs/soft_arm_sim.yaml`, with
   graph tokens and without (`model.use_graph=false`), for each training seed;
3. evaluate every checkpoint and the scripted expert in closed loop on the same `--eval_episodes`
   held-out seeds (scripts/eval_soft_arm.py);
4. write `results.json`, `results.md` (the table) and `success.png` under `--output_dir`.

Every step is a plain command, printed before it runs; finished steps are skipped when the script
is run again (an interrupted training resumes from its last checkpoint).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"graph": "model.use_graph=true", "no_graph": "model.use_graph=false"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/soft_arm_ablation"))
    parser.add_argument("--raw_dir", type=Path, default=Path("artifacts/soft_arm_raw_sim"))
    parser.add_argument("--dataset_dir", type=Path, default=Path("artifacts/soft_arm_lerobot_sim"))
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizer"))
    parser.add_argument("--episodes", type=int, default=100, help="training demonstrations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per training run (the config's)")
    parser.add_argument("--eval_episodes", type=int, default=50, help="held-out seeds per evaluation")
    parser.add_argument("--replan_steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="simulator processes for the demonstrations")
    return parser.parse_args()


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main() -> int:
    args = parse_args()
    python = sys.executable
    if not (args.tokenizer / "tokenizer.json").is_file():
        run([python, "data_prep/make_tokenizer.py", "--output_dir", str(args.tokenizer)])
    run(
        [
            python,
            "data_prep/simulate_soft_arm.py",
            "--output_dir",
            str(args.raw_dir),
            "--episodes",
            str(args.episodes),
            "--workers",
            str(args.workers),
            "--seed",
            "0",
        ]
    )
    run(
        [
            python,
            "data_prep/soft_arm_to_lerobot.py",
            "--raw_dir",
            str(args.raw_dir),
            "--output_dir",
            str(args.dataset_dir),
        ]
    )

    eval_args = ["--num_episodes", str(args.eval_episodes), "--replan_steps", str(args.replan_steps)]
    summaries: dict[str, list[dict]] = {}
    expert_dir = args.output_dir / "eval_expert"
    if not (expert_dir / "summary.json").is_file():
        run([python, "scripts/eval_soft_arm.py", "--expert", *eval_args, "--output_dir", str(expert_dir)])
    summaries["expert"] = [json.loads((expert_dir / "summary.json").read_text())]
    for variant, override in VARIANTS.items():
        summaries[variant] = []
        for seed in args.seeds:
            run_dir = args.output_dir / f"{variant}_seed{seed}"
            eval_dir = run_dir / "eval"
            if not (eval_dir / "summary.json").is_file():
                run(
                    [
                        python,
                        "scripts/train_soft_arm.py",
                        "--config",
                        "configs/soft_arm_sim.yaml",
                        "--resume",
                        "latest",
                        f"output_dir={run_dir}",
                        f"seed={seed}",
                        f"data.root={args.dataset_dir}",
                        f"model.tokenizer={args.tokenizer}",
                        f"train.steps={args.steps}",
                        f"tracking.run_name={variant}_seed{seed}",
                        override,
                    ]
                )
                checkpoint = run_dir / "checkpoints" / "last" / "pretrained_model"
                run(
                    [
                        python,
                        "scripts/eval_soft_arm.py",
                        "--checkpoint",
                        str(checkpoint),
                        *eval_args,
                        "--seed",
                        str(seed),
                        "--label",
                        f"{variant} seed {seed}",
                        "--output_dir",
                        str(eval_dir),
                    ]
                )
            summary = json.loads((eval_dir / "summary.json").read_text())
            summary["train_seed"] = seed
            summary["final_val_loss"] = final_val_loss(run_dir / "metrics.jsonl")
            summaries[variant].append(summary)
    write_results(args, summaries)
    return 0


def final_val_loss(metrics_file: Path) -> float | None:
    losses = [
        record["val/loss"] for record in map(json.loads, metrics_file.read_text().splitlines()) if "val/loss" in record
    ]
    return losses[-1] if losses else None


def write_results(args: argparse.Namespace, summaries: dict[str, list[dict]]) -> None:
    rows = {}
    for name, runs in summaries.items():
        success = [r["success_rate"] for r in runs]
        distance = [r["mean_final_distance_m"] * 100 for r in runs]
        rows[name] = {
            "success_rate_mean": float(np.mean(success)),
            "success_rate_std": float(np.std(success)),
            "final_distance_cm_mean": float(np.mean(distance)),
            "per_seed_success": success,
            "per_seed_final_distance_cm": distance,
            "per_seed_val_loss": [r.get("final_val_loss") for r in runs],
        }
    results = {
        "episodes": args.episodes,
        "train_seeds": args.seeds,
        "steps": args.steps,
        "eval_episodes": args.eval_episodes,
        "replan_steps": args.replan_steps,
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    labels = {"expert": "scripted expert", "graph": "tiny pi0 + graph tokens", "no_graph": "tiny pi0, no graph"}
    lines = [
        "| policy | success (mean ± std over seeds) | per seed | final tip-ball distance (cm) | val loss per seed |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        per_seed = ", ".join(f"{s:.0%}" for s in row["per_seed_success"])
        losses = ", ".join(f"{v:.3f}" for v in row["per_seed_val_loss"] if v is not None) or "-"
        lines.append(
            f"| {labels[name]} | {row['success_rate_mean']:.1%} ± {row['success_rate_std']:.1%} | {per_seed} "
            f"| {row['final_distance_cm_mean']:.1f} | {losses} |"
        )
    (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(rows)
    axis.bar(
        [labels[n] for n in names],
        [rows[n]["success_rate_mean"] for n in names],
        yerr=[rows[n]["success_rate_std"] for n in names],
        color=["tab:gray", "tab:blue", "tab:orange"][: len(names)],
        capsize=4,
    )
    for index, name in enumerate(names):
        axis.scatter([index] * len(rows[name]["per_seed_success"]), rows[name]["per_seed_success"], color="black", s=12)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"success on {args.eval_episodes} held-out seeds")
    axis.set_title(f"soft arm, {args.episodes} demonstrations, {args.steps} steps")
    figure.tight_layout()
    figure.savefig(args.output_dir / "success.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
