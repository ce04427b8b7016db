"""Soak test: do long runs leak? Runs tiny supervised training (`train_soft_arm.py`) and tiny RIPT on
real LIBERO (`train_ript_pi0.py`, with its simulator worker processes) side by side for `--minutes`,
samples each run's process tree every `--sample_every` seconds (resident memory of the trainer and
of its children, its open file descriptors, its child processes and zombies), then stops both with
SIGTERM (they save and exit 0) and fits a line to each series after `--warmup_minutes`.

    python scripts/soak.py --minutes 30            # or: make soak
    python scripts/soak.py --samples outputs/soak/soak.json --output_dir DIR   # re-analyse a soak

Writes `<output_dir>/soak.json` (every sample, the slopes per hour, the runs' exit codes) and
`<output_dir>/soak.png`, and prints the slopes. Flat is the goal: a memory slope within noise, no
growing file descriptors, a constant number of children and no zombie simulators.
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm.auto import tqdm

from lib.run.errors import UserError, exit_code_of

SERIES = ("rss_mib", "children_rss_mib", "open_fds", "children", "zombies")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample_every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--warmup_minutes", type=float, default=3.0, help="left out of the slopes")
    parser.add_argument("--dataset", type=Path, default=Path("artifacts/soft_arm_lerobot_debug"))
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizer"))
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/soak"))
    parser.add_argument(
        "--samples", type=Path, help="analyse the samples of an earlier soak.json (slopes, plot) instead of running"
    )
    args = parser.parse_args()
    if args.minutes <= 0 or args.sample_every <= 0 or args.warmup_minutes < 0:
        parser.error("--minutes and --sample_every must be > 0, --warmup_minutes >= 0")
    if args.samples is not None:
        if not args.samples.is_file():
            raise UserError(f"--samples {args.samples} does not exist (expected a soak.json of an earlier soak)")
        return args
    for path, make in ((args.dataset, "make bench"), (args.tokenizer, "make debug")):
        if not path.exists():
            raise UserError(f"{path} does not exist; `{make}` builds it")
    return args


def start_runs(args: argparse.Namespace) -> dict[str, subprocess.Popen]:
    """Both trainers with more steps than the soak can reach; their output under `output_dir`."""
    common = [f"model.tokenizer={args.tokenizer}", "tracking.report_to=[]", "--overwrite"]
    commands = {
        "train_soft_arm": [
            "scripts/train_soft_arm.py",
            "--config",
            "configs/debug_config.yaml",
            f"data.root={args.dataset}",
            "train.steps=1000000",
            "train.save_every=200",
            f"output_dir={args.output_dir / 'train_soft_arm'}",
        ],
        "train_ript_pi0": [
            "scripts/train_ript_pi0.py",
            "--config",
            "configs/minimal_test.yaml",
            "train.iterations=1000000",
            "train.save_every=10",
            "train.eval_every=10",
            "tracking.video_every=0",
            f"output_dir={args.output_dir / 'train_ript_pi0'}",
        ],
    }
    return {
        name: subprocess.Popen(
            [sys.executable, *command, *common],
            stdout=(args.output_dir / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for name, command in commands.items()
    }


def sample(process: subprocess.Popen) -> dict[str, float]:
    """One reading of a run's process tree (the trainer and every process below it)."""
    trainer = psutil.Process(process.pid)
    children = trainer.children(recursive=True)
    children_rss = 0
    zombies = 0
    for child in children:
        try:
            zombies += child.status() == psutil.STATUS_ZOMBIE
            children_rss += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return {
        "rss_mib": trainer.memory_info().rss / 2**20,
        "children_rss_mib": children_rss / 2**20,
        "open_fds": trainer.num_fds(),
        "children": len(children),
        "zombies": zombies,
    }


def theil_sen_slope(times: np.ndarray, values: np.ndarray) -> float:
    """The median of the slopes between every pair of samples. A LIBERO simulator rebuilds its
    MuJoCo model at each reset, so a sample that catches one mid-reset reads ~700 MiB low; least
    squares tilts with where such dips fall (+453 MiB/h on a flat 30-minute run), the median does not."""
    first, second = np.triu_indices(len(times), k=1)
    return float(np.median((values[second] - values[first]) / (times[second] - times[first])))


def slopes_per_hour(samples: list[dict[str, float]], warmup_minutes: float) -> dict[str, float | None]:
    """Robust slope of each series against time, per hour, after the warm-up."""
    kept = [s for s in samples if s["minute"] >= warmup_minutes]
    if len(kept) < 2:
        return dict.fromkeys(SERIES)
    minutes = np.array([s["minute"] for s in kept])
    return {key: theil_sen_slope(minutes, np.array([s[key] for s in kept], dtype=float)) * 60 for key in SERIES}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run in result["runs"].items():
        minutes = [s["minute"] for s in run["samples"]]
        axes[0].plot(minutes, [s["rss_mib"] + s["children_rss_mib"] for s in run["samples"]], label=name)
        axes[1].plot(minutes, [s["open_fds"] for s in run["samples"]], label=name)
        axes[2].plot(minutes, [s["children"] for s in run["samples"]], label=name)
    for axis, title in zip(
        axes, ("resident memory, tree (MiB)", "open file descriptors", "child processes"), strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("minute")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def report(result: dict, output_dir: Path) -> None:
    """soak.json, soak.png and the table of slopes."""
    (output_dir / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result, output_dir / "soak.png")
    print(f"{'run':16} {'exit':>4} " + " ".join(f"{key + '/h':>20}" for key in SERIES))
    for name, run in result["runs"].items():
        values = " ".join(f"{'-' if v is None else f'{v:+.2f}':>20}" for v in run["slopes_per_hour"].values())
        print(f"{name:16} {run['exit_code']:>4} {values}")
    print(f"soak: {output_dir / 'soak.json'}, {output_dir / 'soak.png'}")


def main() -> int:
    args = parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.samples is not None:  # the slopes of an earlier soak, after --warmup_minutes
        result = json.loads(args.samples.read_text())
        result["warmup_minutes"] = args.warmup_minutes
        for run in result["runs"].values():
            run["slopes_per_hour"] = slopes_per_hour(run["samples"], args.warmup_minutes)
        report(result, args.output_dir)
        return 0
    runs = start_runs(args)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    started = time.monotonic()
    total = args.minutes * 60
    try:
        with tqdm(total=round(total), desc="soak", unit="s") as bar:
            while (elapsed := time.monotonic() - started) < total:
                for name, process in runs.items():
                    if process.poll() is not None:
                        raise UserError(
                            f"{name} ended early (exit {process.returncode}); see its log in {args.output_dir}"
                        )
                    samples[name].append({"minute": elapsed / 60, **sample(process)})
                time.sleep(min(args.sample_every, max(total - elapsed, 0)))
                bar.update(round(time.monotonic() - started) - bar.n)
    finally:
        for process in runs.values():  # SIGTERM: each saves and exits 0
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        exit_codes = {name: process.wait(timeout=600) for name, process in runs.items()}

    result = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "runs": {
            name: {
                "exit_code": exit_codes[name],
                "slopes_per_hour": slopes_per_hour(samples[name], args.warmup_minutes),
                "samples": samples[name],
            }
            for name in runs
        },
    }
    report(result, args.output_dir)
    return 0 if all(code == 0 for code in exit_codes.values()) else 1


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
