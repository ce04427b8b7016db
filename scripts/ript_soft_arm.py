"""Does the RIPT loop learn? RL post-training of a behaviour-cloned graph pi0 on the simulated soft
arm (lib/soft_arm_sim.py), where a tiny pi0 reaches a middling success rate on a CPU, unlike LIBERO.

    python scripts/ript_soft_arm.py --config configs/ript_soft_arm.yaml                # advantage_filtered
    python scripts/ript_soft_arm.py --config configs/ript_soft_arm.yaml rl.objective=cfg_rl \
        model.guidance_weight=2 output_dir=outputs/ript_soft_arm/cfg_rl_w2
    make ript-soft-arm                                  # BC start, every objective, 3 seeds each

The loop is train_ript_pi0.py's, from the same engine (lib/ript.py: `collect_iteration`,
`run_update`, `iteration_statistics`), with the soft-arm simulators as the rollout backend: each
iteration draws task seeds (the "init states": a pool of `env.train_states` training seeds,
reshuffled every pass), rolls out K episodes from each, keeps the groups whose outcomes differ
(dynamic sampling, with the per-state outcome history), gives every rollout its leave-one-out
advantage, and updates the policy with `rl.objective`. The policy is the BC checkpoint as a graph
pi0 with the optimality flag (`PI0GraphCFGPolicy`, flag embedding at zero: it starts as the BC
policy), sampled with guidance weight `model.guidance_weight`.

Success is measured in closed loop on the held-out seeds of eval_soft_arm.py at iteration 0 and
every `eval_every` iterations, for every RL seed. Writes, under `output_dir`, `results.md`,
`summary.json` and `success.png` (held-out success per iteration, every seed), and per seed
`seed<N>/summary.json`, `metrics.jsonl` and `pretrained_model/` (the RL-trained policy:
`PI0GraphCFGPolicy.from_pretrained`). An output_dir that holds seed runs is refused unless
`--resume latest` (finished seeds are kept; an unfinished one runs again from its start) or
`--overwrite`; `--dry_run` runs one iteration of the first seed and writes nothing.
One process (the simulators and the update share it).
"""

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from lerobot.configs import PreTrainedConfig
from tqdm.auto import tqdm

from lib.cfg_pi0 import PI0GraphCFGConfig, PI0GraphCFGPolicy, exploration_noise
from lib.checkpoint import NonFiniteGuard, check_writable_dir
from lib.config import add_run_arguments, load_config, run_overrides
from lib.errors import UserError, exit_code_of
from lib.graph_pi0 import PI0GraphConfig
from lib.pi0 import (
    CheckpointError,
    load_pi0_processors,
    load_pretrained_policy,
    load_tokenizer,
    make_optimizer,
    resolve_pretrained,
)
from lib.ript import (
    StateOutcomeHistory,
    collect_iteration,
    iteration_statistics,
    run_update,
    windows_with_advantages,
)
from lib.rollout import make_policy_fn
from lib.run_logging import append_metrics
from lib.schemas import SoftArmRIPTConfig, validate_soft_arm_ript_config
from lib.soft_arm_sim import SoftArmVectorRollout

HELD_OUT_SEED_START = 10_000_000  # eval_soft_arm.py's
TRAIN_SEED_START = 20_000_000  # the RL "init states"; never in the demonstrations or the held-out set


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, Path("configs/ript_soft_arm.yaml"), example="rl.objective=cfg_rl iterations=30")
    return parser.parse_args()


def check_seed_runs(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """The output_dir convention of the trainers, at the grain of whole seeds: a directory that
    holds seed runs is refused unless `--resume latest` (finished seeds are kept, an unfinished one
    runs again from its start) or `--overwrite` (they are deleted)."""
    check_writable_dir(output_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume not in (None, "latest"):
        raise UserError(f"--resume {resume}: this script resumes whole seeds; pass --resume latest")
    seed_runs = sorted(output_dir.glob("seed*/metrics.jsonl"))
    if seed_runs and not resume and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run; pass --resume latest to keep its finished seeds, "
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


def held_out_success(envs: SoftArmVectorRollout, policy_fn, seeds: list[int], label: str) -> float:
    with tqdm(total=len(seeds), desc=f"{label}: held-out episodes", unit="ep", leave=False) as bar:
        episodes = envs.run([{"seed": seed} for seed in seeds], policy_fn, progress=bar.update)
    return float(np.mean([e.success for e in episodes]))


def run_seed(config, seed: int, source: Path, dry_run: bool = False) -> dict | None:
    """One RL run from `source`; a dry run builds everything, runs one iteration and writes nothing."""
    output_dir = Path(config.output_dir) / f"seed{seed}"
    summary_file = output_dir / "summary.json"
    if summary_file.is_file() and not dry_run:
        print(f"seed {seed}: keeping the finished run in {output_dir}")
        return json.loads(summary_file.read_text())
    started, cpu_started = time.perf_counter(), time.process_time()
    set_seed(seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    policy, preprocessor, postprocessor, tokenizer = load_rl_policy(
        source, config.model.guidance_weight, accelerator.device.type
    )
    optimizer = make_optimizer(policy, config.optim)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)
    env = config.env
    envs = SoftArmVectorRollout(env.num_envs, env.replan_steps, env.max_steps, env.image_size)
    held_out = list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + env.eval_episodes))

    # The "init states": a fixed pool of task seeds, drawn in a new order every pass.
    pool = [{"seed": TRAIN_SEED_START + i} for i in range(env.train_states)]
    order_rng = random.Random(seed)

    def pool_draws():
        while True:
            order = order_rng.sample(pool, len(pool))
            for start in range(0, len(order) - config.rl.states_per_draw + 1, config.rl.states_per_draw):
                yield [dict(state) for state in order[start : start + config.rl.states_per_draw]]

    draws = pool_draws()
    history = StateOutcomeHistory(skip_after=config.rl.skip_after, skip_for=config.rl.skip_for)
    nonfinite = NonFiniteGuard(config.rl.max_nonfinite_steps, "rl.max_nonfinite_steps")

    def rl_iteration(iteration: int) -> tuple:
        """The engine's two calls: rollouts with dynamic sampling, then the update; and their times."""
        started = time.perf_counter()
        with exploration_noise(unwrapped, config.rl):  # Flow-Noise sampling for flow_noise
            rollouts = collect_iteration(
                config.rl, lambda: next(draws), envs, policy_fn, history, key_of=lambda state: state["seed"]
            )
        rollout_time = time.perf_counter() - started
        windows, advantages = windows_with_advantages(rollouts.kept)
        losses = run_update(
            accelerator,
            policy,
            optimizer,
            preprocessor,
            windows,
            advantages,
            config.rl,
            config.optim.grad_clip_norm,
            seed,
            iteration,
            nonfinite,
        )
        return rollouts, advantages, losses, rollout_time, time.perf_counter() - started - rollout_time

    if dry_run:
        rollouts, _, losses, _, _ = rl_iteration(1)
        print(f"dry run ok: one iteration, {len(rollouts.episodes)} episodes, {len(losses)} updates")
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = output_dir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    curve = {0: held_out_success(envs, policy_fn, held_out, f"seed {seed} iteration 0")}
    append_metrics(metrics_file, 0, {"eval/success_rate": curve[0]})
    print(f"seed {seed}: success {curve[0]:.1%} on {len(held_out)} held-out seeds before RL")
    episodes_used = 0
    for iteration in tqdm(range(1, config.iterations + 1), desc=f"seed {seed} iterations"):
        rollouts, advantages, losses, rollout_time, update_time = rl_iteration(iteration)
        statistics = iteration_statistics(accelerator, rollouts, advantages)
        episodes_used += statistics["episodes"]
        metrics = {
            **{f"rollout/{key}": value for key, value in statistics.items()},
            "update/steps": len(losses),
            "update/nonfinite_skipped": nonfinite.pop_skipped(),
            "update/loss": torch.stack(losses).mean().item() if losses else float("nan"),
            "time/rollout_s": rollout_time,
            "time/update_s": update_time,
        }
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            curve[iteration] = held_out_success(envs, policy_fn, held_out, f"seed {seed} iteration {iteration}")
            metrics["eval/success_rate"] = curve[iteration]
        append_metrics(metrics_file, iteration, metrics)
        tqdm.write(
            f"seed {seed} iteration {iteration}: rollout success {statistics['success_rate']:.2f}, "
            f"{statistics['groups_kept']} groups kept, {len(losses)} updates, loss {metrics['update/loss']:.4f}"
            + (f", held-out {curve[iteration]:.1%}" if iteration in curve else "")
        )

    unwrapped.save_pretrained(output_dir / "pretrained_model")
    for extra in (preprocessor, postprocessor, tokenizer):
        extra.save_pretrained(output_dir / "pretrained_model")
    result = {
        "seed": seed,
        "success_before": curve[0],
        "success_after": curve[config.iterations],
        "curve": {str(k): v for k, v in curve.items()},
        "episodes_used": episodes_used,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": (time.process_time() - cpu_started) / 60,
    }
    summary_file.write_text(json.dumps(result, indent=2))
    print(f"seed {seed}: success {result['success_after']:.1%} after RL (before {result['success_before']:.1%})")
    accelerator.free_memory()
    return result


def plot_curves(runs: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        points = sorted((int(k), v) for k, v in run["curve"].items())
        axis.plot(*zip(*points, strict=True), marker=".", label=f"seed {run['seed']}")
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
    overrides = run_overrides(args)
    config = load_config(SoftArmRIPTConfig, args.config, overrides)
    validate_soft_arm_ript_config(config)
    output_dir = Path(config.output_dir)
    source = resolve_pretrained(config.model.pretrained)
    if args.dry_run:
        run_seed(config, config.seeds[0], source, dry_run=True)
        return 0
    check_seed_runs(output_dir, args.resume, args.overwrite)
    runs = [run_seed(config, seed, source) for seed in config.seeds]
    label = f"{config.rl.objective}" + (
        f", w={config.model.guidance_weight:g}" if config.rl.objective == "cfg_rl" else ""
    )
    before, after = [r["success_before"] for r in runs], [r["success_after"] for r in runs]
    summary = {"config": str(args.config), "overrides": overrides, "objective": label, "runs": runs}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(runs, output_dir / "success.png", f"RIPT on the soft arm ({label})")
    lines = [
        f"| RL seed ({label}) | success before ({config.env.eval_episodes} held-out seeds) "
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
