"""The results table of the graph-tokens ablation (docs/soft_arm.md "Graph tokens vs none"): the last step
of `make soft-arm-ablation`, which simulates the demonstrations, trains the tiny pi0 with and
without graph tokens for each seed and evaluates every checkpoint and the scripted expert on the
same held-out tasks (the Makefile's rules say how; finished steps are kept).

    python scripts/soft_arm_ablation_results.py --output_dir outputs/soft_arm_ablation --seeds 0 1 2

Reads `<output_dir>/eval_expert/summary.json` and `<output_dir>/<variant>_seed<N>/eval/summary.json`
(with the run's `metrics.jsonl` for its last val loss); writes `results.json`, `results.md` (the
table) and `success.png` under `--output_dir`.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lib.run.errors import UserError, exit_code_of

VARIANTS = ("graph", "no_graph")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/soft_arm_ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RNG seeds of the training runs")
    parser.add_argument("--episodes", type=int, default=100, help="training demonstrations (for the table)")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per training run (for the table)")
    return parser.parse_args()


def read_summary(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `make soft-arm-ablation` (it evaluates every run first)")
    return json.loads(path.read_text())


def main() -> int:
    args = parse_args()
    summaries = {"expert": [read_summary(args.output_dir / "eval_expert" / "summary.json")]}
    for variant in VARIANTS:
        summaries[variant] = []
        for seed in args.seeds:
            run_dir = args.output_dir / f"{variant}_seed{seed}"
            summary = read_summary(run_dir / "eval" / "summary.json")
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
    expert = summaries["expert"][0]
    results = {
        "episodes": args.episodes,
        "train_seeds": args.seeds,
        "steps": args.steps,
        "eval_episodes": expert["episodes"],
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
    axis.set_ylabel(f"success on {expert['episodes']} held-out tasks")
    axis.set_title(f"soft arm, {args.episodes} demonstrations, {args.steps} steps")
    figure.tight_layout()
    figure.savefig(args.output_dir / "success.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
