"""Does the RIPT loop learn? RL post-training of a behaviour-cloned graph pi0 on the simulated soft
arm (lib/envs/soft_arm/sim.py), where a tiny pi0 reaches a middling success rate on a CPU, unlike LIBERO.

    python scripts/ript_soft_arm.py --config configs/ript_soft_arm.yaml                # advantage_filtered
    python scripts/ript_soft_arm.py --config configs/ript_soft_arm.yaml rl.objective=cfg_rl \
        model.guidance_weight=2 output_dir=outputs/ript_soft_arm/cfg_rl_w2
    make ript-soft-arm                                  # BC start, every objective, 3 runs each

The loop is train_ript_pi0.py's, from the same engine (lib/rl/iteration.py: `RIPTIteration`), with
the soft-arm simulators as the rollout backend: each iteration draws tasks (the "init states":
a pool of `env.train_states` training tasks, reshuffled every pass), rolls out K episodes from each,
keeps the groups whose outcomes differ (dynamic sampling, with the per-state outcome history), gives
every rollout its leave-one-out advantage, and updates the policy with `rl.objective`. The policy is
the BC checkpoint as a graph pi0 with the optimality flag (`PI0GraphCFGPolicy`, flag embedding at
zero: it starts as the BC policy), sampled with guidance weight `model.guidance_weight`.

Success is measured in closed loop on the held-out tasks of eval_soft_arm.py at iteration 0 and
every `eval_every` iterations, for every RL run. Writes, under `output_dir`, `results.md`,
`summary.json` and `success.png` (held-out success per iteration, every run), and per run
`seed<N>/summary.json`, `metrics.jsonl` and `pretrained_model/` (the RL-trained policy:
`PI0GraphCFGPolicy.from_pretrained`).

Each seed's run is checkpointed every `save_every` iterations and at its end
(`seed<N>/checkpoints/step_<iteration>`: policy, optimizer, RNG, sampler position, outcome
history). An output_dir that holds seed runs is refused unless `--resume latest` or `--overwrite`.
`--resume latest` keeps the finished seeds and continues an unfinished one from its newest
checkpoint, exactly as if it had not stopped; with a larger `iterations` it also extends finished
seeds from their last checkpoint. SIGTERM/SIGINT finish the iteration, save and exit 0 (a second
signal ends the process at once). `--dry_run` runs one iteration of the first seed and writes
nothing. One process (the simulators and the update share it).
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from lerobot.configs import PreTrainedConfig
from tqdm.auto import tqdm

from lib.data.soft_arm import open_action_chunks
from lib.envs.soft_arm.features import CHUNK_SIZE
from lib.envs.soft_arm.sim import SoftArmVectorRollout, distance_shaped_reward
from lib.policies.flag_pi0 import PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import PI0GraphConfig
from lib.policies.loading import CheckpointError, load_pretrained_policy, resolve_pretrained
from lib.policies.policy_fn import make_policy_fn
from lib.policies.processors import load_pi0_processors, load_tokenizer
from lib.rl.demos import check_demonstrations
from lib.rl.iteration import RIPTIteration, metrics_of
from lib.rl.ript import RL_IDENTITY_KEYS
from lib.run.checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    STATE_DIR,
    RunIdentity,
    check_writable_dir,
    checkpoint_as_json,
    checkpoint_dirs,
    start_output_dir,
    write_weights_once,
)
from lib.run.config import add_run_arguments, load_config, run_overrides
from lib.run.errors import UserError, exit_code_of
from lib.run.guards import GracefulStop
from lib.run.logs import append_metrics
from lib.run.optim import make_optimizer
from lib.run.schemas import SoftArmRIPTConfig, validate_soft_arm_ript_config

HELD_OUT_SEED_START = 10_000_000  # eval_soft_arm.py's
TRAIN_SEED_START = 20_000_000  # the RL "init states"; never in the demonstrations or the held-out set


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, Path("configs/ript_soft_arm.yaml"), example="rl.objective=cfg_rl iterations=30")
    return parser.parse_args()


def check_seed_runs(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """The output_dir convention of the trainers, per run: a directory that holds runs is refused
    unless `--resume latest` (each run goes on from its newest checkpoint) or `--overwrite` (they
    are deleted)."""
    check_writable_dir(output_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume not in (None, "latest"):
        raise UserError(f"--resume {resume}: each run resumes from its own newest checkpoint; pass --resume latest")
    seed_runs = sorted(output_dir.glob("seed*/metrics.jsonl"))
    if seed_runs and not resume and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run; pass --resume latest to keep its finished runs, "
            "--overwrite to replace it, or another output_dir"
        )
    if overwrite:
        for run in seed_runs:
            shutil.rmtree(run.parent)


def load_rl_policy(source: Path, guidance_weight: float, device: str):
    """A graph checkpoint as a graph pi0 with the optimality flag (from a BC checkpoint the flag
    embedding is zero: it acts as the BC policy), with the checkpoint's processors and tokenizer."""
    saved = PreTrainedConfig.from_pretrained(source)
    if not isinstance(saved, PI0GraphConfig):
        raise CheckpointError(f"{source} holds a {saved.type!r} policy, expected a graph pi0 (train_soft_arm.py)")
    config = saved if isinstance(saved, PI0GraphCFGConfig) else PI0GraphCFGConfig.from_config(saved)
    config.guidance_weight, config.device = guidance_weight, device
    policy = load_pretrained_policy(source, PI0GraphCFGPolicy, config)
    tokenizer = load_tokenizer(source)
    preprocessor, postprocessor = load_pi0_processors(source, tokenizer, device)
    return policy, preprocessor, postprocessor, tokenizer


class SeedRun:
    """What a seed's checkpoint keeps besides the training state: the held-out curve so far, the
    episodes used and the time spent (summed over the sessions of a resumed run)."""

    def __init__(self) -> None:
        self.curve: dict[int, float] = {}
        self.episodes_used = 0
        self.wall_s = self.cpu_s = 0.0

    def state_dict(self) -> dict:
        curve = {str(k): v for k, v in self.curve.items()}
        return {"curve": curve, "episodes_used": self.episodes_used, "wall_s": self.wall_s, "cpu_s": self.cpu_s}

    def load_state_dict(self, state: dict) -> None:
        self.curve = {int(k): v for k, v in state["curve"].items()}
        self.episodes_used, self.wall_s, self.cpu_s = state["episodes_used"], state["wall_s"], state["cpu_s"]


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the simulator workers)."""
    process = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in (process, *process.children(recursive=True)))


def held_out_success(envs: SoftArmVectorRollout, policy_fn, seeds: list[int], label: str) -> float:
    with tqdm(total=len(seeds), desc=f"{label}: held-out episodes", unit="ep", leave=False) as bar:
        episodes = envs.run([{"seed": seed} for seed in seeds], policy_fn, progress=bar.update)
    return float(np.mean([e.success for e in episodes]))


def seed_checkpoint(output_dir: Path, seed: int, iterations: int) -> Path | None:
    """The newest checkpoint of a seed's unfinished (or shorter) run; None for a fresh start."""
    summary_file = output_dir / "summary.json"
    found = checkpoint_dirs(output_dir)
    if summary_file.is_file() and not found:
        done = json.loads(summary_file.read_text()).get("iterations")
        raise UserError(
            f"run {seed}: {output_dir} holds a finished run of {done} iterations without a checkpoint to extend "
            f"to iterations={iterations}; pass --overwrite or another output_dir"
        )
    return found[-1] if found else None


def run_seed(
    config,
    seed: int,
    source: Path,
    envs: SoftArmVectorRollout,
    stop: GracefulStop,
    demos=None,
    dry_run: bool = False,
) -> dict | None:
    """One RL run from `source`, or from the run's newest checkpoint, with `demos` as the update's
    anchor (`rl.demo_dataset`). Returns its summary; None after a dry run (one iteration, nothing
    written) or a stop signal (saved, resumable)."""
    output_dir = Path(config.output_dir) / f"seed{seed}"
    summary_file = output_dir / "summary.json"
    if summary_file.is_file() and not dry_run:
        finished = json.loads(summary_file.read_text())
        if finished.get("iterations", max(map(int, finished["curve"]))) >= config.iterations:
            print(f"run {seed}: keeping the finished run in {output_dir}")
            return finished
    checkpoint = None if dry_run else seed_checkpoint(output_dir, seed, config.iterations)
    identity = RunIdentity(config, [*RL_IDENTITY_KEYS, "rl.distance_penalty"])
    if checkpoint is not None:
        identity.check(checkpoint)  # extending a run with another objective is another experiment
    started, cpu_started = time.perf_counter(), cpu_seconds()
    set_seed(seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    policy, preprocessor, postprocessor, tokenizer = load_rl_policy(
        source, config.model.guidance_weight, accelerator.device.type
    )
    optimizer = make_optimizer(policy, config.optim)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    if demos is not None:
        action_shape = (unwrapped.config.chunk_size, unwrapped.action_dim)
        check_demonstrations(demos, unwrapped.config.input_features, action_shape, config.rl.demo_dataset)
    write_weights_once(accelerator)  # a checkpoint's weights live in its pretrained_model/ only
    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)
    held_out = list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + config.env.eval_episodes))

    # The "init states": a fixed pool of tasks, drawn in a new order every pass.
    pool = [{"seed": TRAIN_SEED_START + i} for i in range(config.env.train_states)]
    order_rng = random.Random(seed)

    def pool_draws():
        while True:
            order = order_rng.sample(pool, len(pool))
            for start in range(0, len(order) - config.rl.states_per_draw + 1, config.rl.states_per_draw):
                yield [dict(state) for state in order[start : start + config.rl.states_per_draw]]

    def next_draw() -> list[dict]:
        progress.draws += 1
        return next(draws)

    # One RIPT iteration end to end (lib/rl/iteration.py), the same engine as train_ript_pi0.py's.
    engine = RIPTIteration(
        accelerator,
        policy,
        optimizer,
        preprocessor,
        policy_fn,
        next_draw,
        lambda state: state["seed"],
        config.rl,
        config.optim,
        seed,
        config.iterations,
        reward_of=distance_shaped_reward(config.rl.distance_penalty),
        stop=stop,
        demos=demos,
    )
    # What a checkpoint restores besides weights, optimizer and RNG (training_state/state.json).
    progress, run = engine.progress, SeedRun()
    checkpoint_as_json(accelerator, progress=progress, history=engine.history, run=run, identity=identity)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / STATE_DIR))
        print(f"run {seed}: resumed from {checkpoint} at iteration {progress.iteration}")
    draws = pool_draws()
    for _ in range(progress.draws):  # the pool order is a function of the seed: replay it
        next(draws)

    if dry_run:
        record = engine.run(1, envs).record
        print(f"dry run ok: one iteration, {record['episodes']} episodes, {record['update_steps']} updates")
        return None
    # A fresh start clears what an unfinished run without a checkpoint left; a resume drops the
    # metrics rows logged after its checkpoint.
    start_output_dir(output_dir, checkpoint, overwrite=checkpoint is None)
    metrics_file = output_dir / "metrics.jsonl"
    curve = run.curve
    if checkpoint is None:
        curve[0] = held_out_success(envs, policy_fn, held_out, f"run {seed} iteration 0")
        append_metrics(metrics_file, 0, metrics_of({"eval_success_rate": curve[0]}))
        print(f"run {seed}: success {curve[0]:.1%} on {len(held_out)} held-out tasks before RL")

    earlier_wall_s, earlier_cpu_s = run.wall_s, run.cpu_s  # of the sessions before a resume

    def time_spent() -> tuple[float, float]:
        """Wall and CPU seconds of the whole run, the sessions before a resume included."""
        return earlier_wall_s + time.perf_counter() - started, earlier_cpu_s + cpu_seconds() - cpu_started

    def save() -> None:
        run.wall_s, run.cpu_s = time_spent()
        engine.save(output_dir, [preprocessor, postprocessor, tokenizer], config.keep_last)

    first = progress.iteration + 1
    iterations = tqdm(
        range(first, config.iterations + 1), desc=f"run {seed} iterations", initial=first - 1, total=config.iterations
    )
    for iteration in iterations:
        result = engine.run(iteration, envs)
        # A dense signal beside success: how close the tip ended, over this iteration's episodes.
        record = {**result.record, "final_distance_m": float(np.mean([e.final_distance for e in result.episodes]))}
        run.episodes_used += record["episodes"]
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            curve[iteration] = held_out_success(envs, policy_fn, held_out, f"run {seed} iteration {iteration}")
            record["eval_success_rate"] = curve[iteration]
        append_metrics(metrics_file, iteration, metrics_of(record))
        tqdm.write(
            f"run {seed} iteration {iteration}: rollout success {record['success_rate']:.2f}, "
            f"{record['groups_kept']} groups kept, {record['update_steps']} updates, "
            f"loss {float('nan') if record['loss'] is None else record['loss']:.4f}"
            + (f", held-out {curve[iteration]:.1%}" if iteration in curve else "")
        )
        del result
        stopped = engine.should_stop()
        if iteration % config.save_every == 0 or iteration == config.iterations or stopped:
            save()
        if stopped:
            print(f"run {seed}: signal {stop.received} received, saved at iteration {iteration}; --resume latest")
            return None

    # The policy after RL is the last checkpoint's (the last iteration is always saved).
    final_policy = output_dir / MODEL_DIR
    if final_policy.is_dir() and not final_policy.is_symlink():
        shutil.rmtree(final_policy)  # what a run of an earlier version of this script saved here
    final_policy.unlink(missing_ok=True)
    final_policy.symlink_to(Path(CHECKPOINTS_DIR) / "last" / MODEL_DIR)
    wall_s, cpu_s = time_spent()
    result = {
        "seed": seed,
        "iterations": config.iterations,
        "success_before": curve[0],
        "success_after": curve[config.iterations],
        "curve": {str(k): v for k, v in curve.items()},
        "episodes_used": run.episodes_used,
        "wall_minutes": wall_s / 60,
        "cpu_minutes": cpu_s / 60,
    }
    summary_file.write_text(json.dumps(result, indent=2))
    print(f"run {seed}: success {result['success_after']:.1%} after RL (before {result['success_before']:.1%})")
    accelerator.free_memory()
    return result


def plot_curves(runs: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        points = sorted((int(k), v) for k, v in run["curve"].items())
        axis.plot(*zip(*points, strict=True), marker=".", label=f"run {run['seed']}")
    axis.set_xlabel("RL iteration")
    axis.set_ylabel("held-out success rate")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def main() -> int:
    args = parse_args()
    # One process runs the seeds one after another (seeds run in parallel as separate processes,
    # `seeds=[N]`); every rank of a multi-process launch would run every seed into the same files.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "ript_soft_arm.py runs in one process: start it with python, not a multi-process launcher "
            "(to run seeds in parallel, start one process per seed with seeds=[N])"
        )
    overrides = run_overrides(args)
    config = load_config(SoftArmRIPTConfig, args.config, overrides)
    validate_soft_arm_ript_config(config)
    output_dir = Path(config.output_dir)
    source = resolve_pretrained(config.model.pretrained)
    stop = GracefulStop()  # SIGTERM/SIGINT: the run saves after its iteration and the script exits 0
    # The anchor's demonstrations: every episode of the BC dataset (training tasks only).
    demos = None
    if config.rl.demo_dataset is not None:
        demos = open_action_chunks(config.rl.demo_dataset, CHUNK_SIZE, config.env.image_size, key="rl.demo_dataset")
    if not args.dry_run:
        check_seed_runs(output_dir, args.resume, args.overwrite)
    env = config.env
    runs = []
    # The simulator workers, started once for every seed of the run.
    with SoftArmVectorRollout(env.num_envs, env.replan_steps, env.max_steps, env.image_size) as envs:
        if args.dry_run:
            run_seed(config, config.seeds[0], source, envs, stop, demos, dry_run=True)
            return 0
        for seed in config.seeds:
            result = run_seed(config, seed, source, envs, stop, demos)
            if result is None:
                return 0
            runs.append(result)
    label = f"{config.rl.objective}" + (
        f", w={config.model.guidance_weight:g}" if config.rl.objective == "cfg_rl" else ""
    )
    before, after = [r["success_before"] for r in runs], [r["success_after"] for r in runs]
    summary = {"config": str(args.config), "overrides": overrides, "objective": label, "runs": runs}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(runs, output_dir / "success.png", f"RIPT on the soft arm ({label})")
    lines = [
        f"| RL run ({label}) | success before ({config.env.eval_episodes} held-out tasks) "
        f"| after {config.iterations} iterations | episodes | CPU min |",
        "|---|---|---|---|---|",
        *[
            f"| {r['seed']} | {r['success_before']:.0%} | {r['success_after']:.0%} | {r['episodes_used']} "
            f"| {r['cpu_minutes']:.0f} |"
            for r in runs
        ],
        f"| mean ± std | {np.mean(before):.1%} ± {np.std(before):.1%} | {np.mean(after):.1%} ± {np.std(after):.1%} "
        f"| | |",
    ]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
