"""The objectives side by side (docs/ript.md "RIPT on the simulated soft arm"): the last step of
`make ript-soft-arm`, after `scripts/ript_soft_arm.py` has run each objective.

    python scripts/ript_soft_arm_results.py --runs_dir outputs/ript_soft_arm

Reads every `<runs_dir>/<arm>/seed<N>/summary.json` (the finished RL runs of each arm; an arm
with none is left out) and writes `<runs_dir>/comparison.md` (success before/after per run, mean
± std, episodes and CPU minutes) and `<runs_dir>/comparison.png` (held-out success against the RL
iteration: each arm's mean over its runs, the runs thin). Where `<runs_dir>/pass_at_8/` holds the
8-attempt evaluations (`eval_soft_arm.py --attempts 8`) of the BC start (`bc_few20/`) and of RL
policies, also `<runs_dir>/pass_at_8/split.md`: each policy's success on the held-out tasks the start
never, sometimes and always solved (what RL gained where, and what it gave back).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lib.run.errors import UserError, exit_code_of


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, default=Path("outputs/ript_soft_arm"))
    return parser.parse_args()


def finished_arms(runs_dir: Path) -> dict[str, list[dict]]:
    arms = {}
    for arm_dir in sorted(path for path in runs_dir.iterdir() if path.is_dir()):
        runs = [json.loads(path.read_text()) for path in sorted(arm_dir.glob("seed*/summary.json"))]
        if runs:
            arms[arm_dir.name] = runs
    if not arms:
        raise UserError(f"{runs_dir} holds no finished RL run (<arm>/seed<N>/summary.json): run make ript-soft-arm")
    return arms


def plot(arms: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (arm, runs) in enumerate(arms.items()):
        color = f"C{index}"
        iterations = sorted({int(k) for run in runs for k in run["curve"]})
        for run in runs:
            points = sorted((int(k), v) for k, v in run["curve"].items())
            axis.plot(*zip(*points, strict=True), color=color, alpha=0.25, linewidth=1)
        means = [np.mean([run["curve"][str(i)] for run in runs if str(i) in run["curve"]]) for i in iterations]
        axis.plot(iterations, means, color=color, marker="o", linewidth=2, label=f"{arm} ({len(runs)} runs)")
    axis.set_xlabel("RL iteration")
    axis.set_ylabel("held-out success rate (100 tasks)")
    axis.set_ylim(0, 1)
    axis.set_title("RIPT on the soft arm: every objective from the same BC start")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def split_by_start(pass_at_8_dir: Path) -> list[str]:
    """The split table of every evaluation in `pass_at_8_dir` against the start's (`bc_few20`)."""
    start = json.loads((pass_at_8_dir / "bc_few20" / "summary.json").read_text())

    def successes(summary: dict) -> dict[int, int]:
        counts: dict[int, int] = {}
        for episode in summary["per_episode"]:
            counts[episode["seed"]] = counts.get(episode["seed"], 0) + int(episode["success"])
        return counts

    attempts = start["attempts"]
    start_counts = successes(start)
    groups = {
        "never": [s for s, c in start_counts.items() if c == 0],
        "sometimes": [s for s, c in start_counts.items() if 0 < c < attempts],
        "always": [s for s, c in start_counts.items() if c == attempts],
    }
    lines = [
        f"| policy | success ({start['episodes']} episodes) | pass@{attempts} "
        + "".join(f"| on the start's {name} tasks ({len(seeds)}) " for name, seeds in groups.items())
        + "|",
        "|---|---|---" + "|---" * len(groups) + "|",
    ]
    for path in sorted(pass_at_8_dir.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        counts = successes(summary)
        cells = [
            f"{sum(counts[s] for s in seeds) / max(len(seeds) * summary['attempts'], 1):.1%}"
            for seeds in groups.values()
        ]
        lines.append(
            f"| {path.parent.name} | {summary['success_rate']:.1%} | {summary['pass_at_attempts']:.0%} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main() -> int:
    args = parse_args()
    arms = finished_arms(args.runs_dir)
    lines = [
        "| arm | runs | success before | after | gain (mean) | per run (before → after) | episodes / run "
        "| CPU min / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, runs in arms.items():
        before = [run["success_before"] for run in runs]
        after = [run["success_after"] for run in runs]
        per_run = ", ".join(f"{b:.0%} → {a:.0%}" for b, a in zip(before, after, strict=True))
        lines.append(
            f"| {arm} | {len(runs)} | {np.mean(before):.1%} ± {np.std(before):.1%} "
            f"| {np.mean(after):.1%} ± {np.std(after):.1%} | {100 * (np.mean(after) - np.mean(before)):+.1f} pts "
            f"| {per_run} | {np.mean([run['episodes_used'] for run in runs]):.0f} "
            f"| {np.mean([run['cpu_minutes'] for run in runs]):.0f} |"
        )
    (args.runs_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(arms, args.runs_dir / "comparison.png")
    print("\n".join(lines))
    print(f"plot: {args.runs_dir / 'comparison.png'}")
    pass_at_8_dir = args.runs_dir / "pass_at_8"
    if (pass_at_8_dir / "bc_few20" / "summary.json").is_file():
        split = split_by_start(pass_at_8_dir)
        (pass_at_8_dir / "split.md").write_text("\n".join(split) + "\n")
        print("\n".join(split))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
