"""Closed-loop evaluation on the simulated soft arm (lib/envs/soft_arm/sim.py): success rate, final
tip-to-ball distance and episode length of a checkpoint (or the scripted expert) on held-out tasks.

    python scripts/eval_soft_arm.py --checkpoint outputs/soft_arm_sim/checkpoints/last/pretrained_model \
        --num_episodes 50 --output_dir outputs/eval_soft_arm
    python scripts/eval_soft_arm.py --expert --output_dir outputs/eval_soft_arm_expert

Episodes run on `--num_envs` simulators at once with one batched policy call per round; the policy
executes the first `--replan_steps` actions of each 16-step chunk before it is called again.
Held-out tasks (a task is the simulator's RNG seed) start at 10_000_000; no demonstration of
data_prep/simulate_soft_arm.py is of one (its tasks lie at or above 2**32). Writes `summary.json`
(rates and per-episode results), `distance.png` (tip-to-ball distance over each episode) and
`videos/seed<S>_<success|failure>.mp4` (S: the task) for the first `--videos` episodes. Accepts
checkpoints written by scripts/train_soft_arm.py and scripts/ript_soft_arm.py. `--attempts N` runs
every task N times on fresh noise and adds pass@N (tasks solved at least once) and the tasks solved
every time or never: what sharpening the policy could reach without learning anything new. `--server
ws://HOST:PORT` evaluates the policy a `serve_policy.py` serves instead, each observation sent over
the network (the robot's view).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.envs.soft_arm.sim import CONTROL_HZ, MAX_STEPS, SUCCESS_RADIUS, expert_policy_fn, run_soft_arm_episodes
from lib.policies.flag_pi0 import PI0GraphCFGPolicy
from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.policy_fn import load_policy_fn
from lib.run.checkpoint import check_writable_dir
from lib.run.errors import exit_code_of
from lib.serving.openpi import remote_policy_fn

HELD_OUT_SEED_START = 10_000_000
# train_soft_arm.py's graph pi0, and the RL-trained graph pi0 with the flag of ript_soft_arm.py.
CHECKPOINT_TYPES = {PI0GraphPolicy.name: PI0GraphPolicy, PI0GraphCFGPolicy.name: PI0GraphCFGPolicy}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    policy = parser.add_mutually_exclusive_group(required=True)
    policy.add_argument("--checkpoint", type=Path, help="a pretrained_model directory of train_soft_arm.py")
    policy.add_argument("--expert", action="store_true", help="evaluate the scripted expert (the reference)")
    policy.add_argument(
        "--server", help="evaluate the policy an openpi-protocol server serves (serve_policy.py), e.g. ws://host:8000"
    )
    parser.add_argument("--api_key", default=None, help="the --server's API key, if it has one")
    parser.add_argument("--num_episodes", type=int, default=50)
    parser.add_argument(
        "--seed_start", type=int, default=HELD_OUT_SEED_START, help="the first task; episodes use consecutive tasks"
    )
    parser.add_argument("--num_envs", type=int, default=10, help="simulators stepped per batched policy call")
    parser.add_argument("--replan_steps", type=int, default=8, help="chunk actions executed between policy calls")
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--videos", type=int, default=3, help="record the first N episodes")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the flow-matching noise")
    parser.add_argument(
        "--attempts",
        type=int,
        default=1,
        help="episodes per task, each on its own flow-matching noise: adds pass@attempts (a task solved at least "
        "once) and how many tasks are solved every time or never",
    )
    parser.add_argument("--label", default=None, help="name in the plot title (default: policy or expert)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/eval_soft_arm"))
    args = parser.parse_args()
    if min(args.num_episodes, args.num_envs, args.replan_steps, args.max_steps, args.attempts) < 1:
        parser.error("--num_episodes, --num_envs, --replan_steps, --max_steps and --attempts must be >= 1")
    return args


def plot_distances(episodes, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for episode in episodes:
        seconds = np.arange(1, len(episode.distances) + 1) / CONTROL_HZ
        axis.plot(seconds, episode.distances, color="tab:green" if episode.success else "tab:red", alpha=0.5, lw=1)
    axis.axhline(SUCCESS_RADIUS, color="black", ls="--", lw=1, label=f"success radius {SUCCESS_RADIUS * 100:.0f} cm")
    axis.set_xlabel("time (s)")
    axis.set_ylabel("tip to ball distance (m)")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def attempts_summary(episodes, attempts: int) -> dict:
    """How the successes spread over the tasks when each task ran `attempts` times."""
    successes_by_seed: dict[int, int] = {}
    for episode in episodes:
        successes_by_seed[episode.seed] = successes_by_seed.get(episode.seed, 0) + int(episode.success)
    counts = list(successes_by_seed.values())
    return {
        "attempts": attempts,
        "pass_at_attempts": sum(count > 0 for count in counts) / len(counts),
        "seeds_solved_every_attempt": sum(count == attempts for count in counts),
        "seeds_never_solved": sum(count == 0 for count in counts),
        "seeds_by_successes": {k: counts.count(k) for k in range(attempts + 1)},
    }


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    check_writable_dir(args.output_dir)  # before the episodes, not after them
    if args.expert:
        policy_fn = expert_policy_fn()
    elif args.server:  # the robot side of a deployment: each observation goes over the network
        policy_fn = remote_policy_fn(args.server, args.api_key)
    else:
        policy_fn = load_policy_fn(args.checkpoint, CHECKPOINT_TYPES)
    # The expert acts every step; a policy runs `replan_steps` of each chunk.
    replan_steps = 1 if args.expert else args.replan_steps
    seeds = list(range(args.seed_start, args.seed_start + args.num_episodes))
    started = time.perf_counter()
    with tqdm(total=len(seeds) * args.attempts, desc="soft-arm episodes", unit="ep") as bar:
        # the attempts at a task differ only in the noise, drawn on from the one torch seed
        episodes = run_soft_arm_episodes(
            seeds * args.attempts,
            policy_fn,
            num_envs=args.num_envs,
            replan_steps=replan_steps,
            max_steps=args.max_steps,
            image_size=args.image_size,
            record=range(min(args.videos, len(seeds))),  # first attempts only: one video per task
            progress=bar.update,
        )
    elapsed = time.perf_counter() - started

    from lerobot.utils.io_utils import write_video

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "videos").mkdir(exist_ok=True)
    for episode in episodes:
        if episode.frames:
            outcome = "success" if episode.success else "failure"
            write_video(args.output_dir / "videos" / f"seed{episode.seed}_{outcome}.mp4", episode.frames, CONTROL_HZ)
    successes = [e.success for e in episodes]
    summary = {
        "policy": "scripted expert" if args.expert else args.server or str(args.checkpoint),
        "episodes": len(episodes),
        "seeds": [seeds[0], seeds[-1]],
        "success_rate": float(np.mean(successes)),
        "mean_final_distance_m": float(np.mean([e.final_distance for e in episodes])),
        "mean_length": float(np.mean([e.length for e in episodes])),
        "mean_length_success": float(np.mean([e.length for e in episodes if e.success])) if any(successes) else None,
        "max_steps": args.max_steps,
        "replan_steps": replan_steps,
        "seconds": elapsed,
        "episodes_rerun": sum(e.retries for e in episodes),  # after a simulator died or hung
        "per_episode": [
            {
                "seed": e.seed,
                "instruction": e.instruction,
                "success": e.success,
                "length": e.length,
                "final_distance_m": e.final_distance,
                # minus the tip-to-ball distance summed over the steps: the return of the same
                # episode under the Gymnasium env (lib/envs/soft_arm/gym_env.py), whose reward that is
                "return": -float(np.sum(e.distances)),
            }
            for e in episodes
        ],
    }
    if args.attempts > 1:
        summary.update(attempts_summary(episodes, args.attempts))
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    name = args.label or ("scripted expert" if args.expert else "policy")
    plot_distances(episodes, args.output_dir / "distance.png", f"{name}: {summary['success_rate']:.0%} success")
    if args.attempts > 1:
        print(
            f"pass@{args.attempts} {summary['pass_at_attempts']:.1%}: {summary['seeds_solved_every_attempt']} tasks "
            f"solved every attempt, {summary['seeds_never_solved']} never"
        )
    print(
        f"success {summary['success_rate']:.1%} over {len(episodes)} episodes, final distance "
        f"{summary['mean_final_distance_m'] * 100:.1f} cm, length {summary['mean_length']:.1f} steps; "
        f"{elapsed:.0f} s; results in {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
