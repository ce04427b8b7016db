"""Success rate of a pi0 checkpoint on a LIBERO suite, per task, under the standard protocol
(every task's 50 init states, the suite's step limit), with videos, a JSON and a bar chart.

    python scripts/eval_libero.py --checkpoint outputs/ript/checkpoints/last/pretrained_model \
        --benchmark libero_spatial --num_envs 8 --output_dir outputs/eval_libero

Writes `summary.json` (overall and per-task success, episode lengths), `success_per_task.png`
and `videos/task<T>_init<I>_<success|failure>.mp4` (the first `--videos_per_task` episodes of each
task). Accepts checkpoints written by `train_ript_pi0.py` (flag-conditioned pi0).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.envs.libero.rollout import LiberoInitStateDataset, VectorLiberoRollout
from lib.envs.libero.worker import max_steps_of
from lib.policies.flag_pi0 import PI0CFGPolicy
from lib.policies.policy_fn import load_policy_fn
from lib.run.checkpoint import check_writable_dir
from lib.run.errors import exit_code_of
from lib.run.schemas import LIBERO_BENCHMARKS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a pretrained_model directory")
    parser.add_argument("--benchmark", default="libero_spatial", choices=LIBERO_BENCHMARKS)
    parser.add_argument("--task_names", nargs="*", default=None, help="default: every task of the suite")
    parser.add_argument("--num_init_states", type=int, default=50, help="init states per task (protocol: 50)")
    parser.add_argument("--num_envs", type=int, default=8)
    parser.add_argument("--camera_size", type=int, default=224)
    parser.add_argument("--max_steps", type=int, default=None, help="default: the suite's standard limit")
    parser.add_argument("--replan_steps", type=int, default=5)
    parser.add_argument("--settle_steps", type=int, default=10, help="no-op steps after a reset (protocol: 10)")
    parser.add_argument("--videos_per_task", type=int, default=2)
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/eval_libero"))
    return parser.parse_args()


def plot_per_task(tasks: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(tasks)), 4))
    axis.bar([str(t["task_id"]) for t in tasks], [t["success_rate"] for t in tasks], color="tab:blue")
    axis.set_ylim(0, 1)
    axis.set_xlabel("task id")
    axis.set_ylabel("success rate")
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    check_writable_dir(args.output_dir)  # before the episodes, not after them
    # A train_ript_pi0.py checkpoint, or a plain LeRobot pi0 (a run's starting point): loaded into
    # the flag-conditioned class with a zero flag embedding, it acts exactly as that pi0.
    policy_fn = load_policy_fn(args.checkpoint, {PI0CFGPolicy.name: PI0CFGPolicy, "pi0": PI0CFGPolicy})

    init_states = LiberoInitStateDataset(args.benchmark, args.task_names, list(range(args.num_init_states)))
    requests = [dict(item, record=item["init_index"] < args.videos_per_task) for item in init_states]
    max_steps = args.max_steps or max_steps_of(args.benchmark)
    started = time.perf_counter()
    with (
        VectorLiberoRollout(
            args.benchmark,
            args.num_envs,
            args.camera_size,
            max_steps,
            args.replan_steps,
            seed=args.seed,
            settle_steps=args.settle_steps,
        ) as envs,
        tqdm(total=len(requests), desc=f"{args.benchmark} episodes") as bar,
    ):
        results = envs.run(requests, policy_fn, progress=bar.update)
        worker_restarts = envs.worker_restarts
    elapsed = time.perf_counter() - started

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "videos").mkdir(exist_ok=True)
    from lerobot.utils.io_utils import write_video

    tasks: dict[int, dict] = {}
    for result in results:
        request = result.request
        task = tasks.setdefault(
            int(request["task_id"]),
            {"task_id": int(request["task_id"]), "instruction": request["instruction"], "outcomes": [], "lengths": []},
        )
        task["outcomes"].append(bool(result.success))
        task["lengths"].append(result.length)
        if result.frames:
            outcome = "success" if result.success else "failure"
            name = f"task{request['task_id']}_init{request['init_index']}_{outcome}.mp4"
            write_video(args.output_dir / "videos" / name, result.frames, args.fps)
    per_task = [
        {
            "task_id": t["task_id"],
            "instruction": t["instruction"],
            "episodes": len(t["outcomes"]),
            "success_rate": float(np.mean(t["outcomes"])),
            "mean_length": float(np.mean(t["lengths"])),
        }
        for t in sorted(tasks.values(), key=lambda t: t["task_id"])
    ]
    summary = {
        "checkpoint": str(args.checkpoint),
        "benchmark": args.benchmark,
        "episodes": len(results),
        "overall_success_rate": float(np.mean([r.success for r in results])),
        "max_steps": max_steps,
        "replan_steps": args.replan_steps,
        "worker_restarts": worker_restarts,
        "seconds": elapsed,
        "tasks": per_task,
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_per_task(
        per_task,
        args.output_dir / "success_per_task.png",
        f"{args.benchmark}: {summary['overall_success_rate']:.1%} overall",
    )
    for task in per_task:
        print(f"task {task['task_id']:2d}  {task['success_rate']:6.1%}  {task['instruction']}")
    print(f"overall {summary['overall_success_rate']:.1%} over {len(results)} episodes; results in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
