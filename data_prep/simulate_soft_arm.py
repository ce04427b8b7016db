"""Record scripted-expert demonstrations of the simulated soft arm (MuJoCo; lib/envs/soft_arm/sim.py)
as raw soft-arm episodes (format: lib/data/soft_arm.py).

    python data_prep/simulate_soft_arm.py --output_dir artifacts/soft_arm_raw --episodes 100 --workers 2

Episode i of `--seed S` demonstrates task `demonstration_task(S, i, 0)` (a task is the simulator's RNG
seed; it fixes the ball, colour, instruction, arm stiffness and start shape), so a seed and an
index always give the same episode. Demonstration tasks lie at or above 2**32; held-out evaluation
(scripts/eval_soft_arm.py, tasks from 10_000_000 on) and RL (scripts/ript_soft_arm.py, from
20_000_000 on) lie below, so no demonstration is ever of an evaluated task. Only successful
demonstrations are written; on the rare task where the expert fails, the episode is re-drawn from
the next attempt's task (`demonstration_task(S, i, attempt)`) and the failure is counted.
Existing episode files are kept, so an interrupted run resumes where it stopped.
Writes `simulation_report.json` (episodes written/kept, expert failures, episodes per minute).
"""

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lib.data.soft_arm import RawEpisode, save_raw_episode
from lib.envs.soft_arm.features import ACTION_KEY, GRAPH_KEY, IMAGE_KEY, STATE_KEY
from lib.envs.soft_arm.sim import CONTROL_HZ, MAX_STEPS, ScriptedExpert, SoftArmSim
from lib.run.keys import stable_key

MAX_ATTEMPTS = 5
_simulator: SoftArmSim | None = None  # one per worker process, reused across episodes


DEMONSTRATION_TASKS_START = 2**32  # the evaluation and RL tasks are below


def demonstration_task(seed: int, index: int, attempt: int) -> int:
    return DEMONSTRATION_TASKS_START + stable_key("demonstration task", seed, index, attempt) % 2**62


def demonstrate(task: int, image_size: int) -> tuple[RawEpisode | None, int]:
    """One expert episode; (episode, steps) on success, (None, steps) on failure."""
    global _simulator
    if _simulator is None:
        _simulator = SoftArmSim(image_size)
    sim = _simulator
    observation = sim.reset(task)
    expert = ScriptedExpert()
    steps: list[dict] = []
    for _ in range(MAX_STEPS):
        action = expert.act(observation)
        steps.append({**observation, ACTION_KEY: action})
        observation, success = sim.step(action)
        if success:
            episode = RawEpisode(
                path=Path(),
                images=np.stack([s[IMAGE_KEY] for s in steps]),
                actions=np.stack([s[ACTION_KEY] for s in steps]),
                graph=np.stack([s[GRAPH_KEY] for s in steps]),
                state=np.stack([s[STATE_KEY] for s in steps]),
                instruction=sim.task.instruction,
                fps=CONTROL_HZ,
            )
            return episode, len(steps)
    return None, len(steps)


def record_episode(job: tuple[Path, int, int, int]) -> dict:
    """Write episode `index` to `path`, re-drawing its task if the expert fails."""
    path, seed, index, image_size = job
    for attempt in range(MAX_ATTEMPTS):
        episode, steps = demonstrate(demonstration_task(seed, index, attempt), image_size)
        if episode is not None:
            save_raw_episode(path, episode)
            return {"index": index, "steps": steps, "expert_failures": attempt}
    raise RuntimeError(f"the scripted expert failed {MAX_ATTEMPTS} tasks in a row for episode {index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="simulator processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    if args.episodes < 1 or args.workers < 1:
        parser.error("--episodes and --workers must be >= 1")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (path, args.seed, index, args.image_size)
        for index in range(args.episodes)
        if not (path := args.output_dir / f"episode_{index:06d}.npz").exists()
    ]
    started = time.perf_counter()
    records = []
    with tqdm(total=len(jobs), desc="episodes", unit="ep") as bar:
        if args.workers == 1:
            for job in jobs:
                records.append(record_episode(job))
                bar.update()
            if _simulator is not None:
                _simulator.close()
        else:
            # spawn: no fork of a process that has an EGL context
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                for record in pool.imap_unordered(record_episode, jobs):
                    records.append(record)
                    bar.update()
    elapsed = time.perf_counter() - started
    report = {
        "seed": args.seed,
        "episodes_requested": args.episodes,
        "episodes_written": len(records),
        "episodes_kept": args.episodes - len(jobs),
        "expert_failures": sum(r["expert_failures"] for r in records),
        "mean_steps": float(np.mean([r["steps"] for r in records])) if records else None,
        "workers": args.workers,
        "image_size": args.image_size,
        "seconds": elapsed,
        "episodes_per_minute": 60 * len(records) / elapsed if records else None,
    }
    (args.output_dir / "simulation_report.json").write_text(json.dumps(report, indent=2))
    rate = f", {report['episodes_per_minute']:.0f} episodes/min" if records else ""
    print(
        f"{len(records)} episodes written, {report['episodes_kept']} kept, "
        f"{report['expert_failures']} expert failures re-drawn{rate}; in {args.output_dir}"
    )


if __name__ == "__main__":
    main()
