"""Stage 10 of the RIPT reproduction: stage 09 + multi-process training (see scripts/STAGES.md).

New: Hugging Face Accelerate runs the script on several processes (GPUs, or CPU processes over
gloo). Each rank rolls out from its own shard of the init states in its own simulators, the
gradients are averaged by DDP, and the statistics are reduced across ranks. The original's
`setup_distributed` / `get_model_from_ddp` / `cleanup_distributed` are `Accelerator(...)` /
`accelerator.unwrap_model` / `wait_for_everyone` + `end_training` below.

    python scripts/10_train_with_distributed.py --config configs/debug_train_pi0.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/10_train_with_distributed.py \
        --config configs/minimal_test.yaml
    torchrun --nproc_per_node 2 scripts/10_train_with_distributed.py \
        --config configs/minimal_test.yaml
"""

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from omegaconf import DictConfig, OmegaConf

from lib.envs.libero.rollout import VectorLiberoRollout
from lib.envs.libero.worker import get_suite
from lib.policies.factories import make_ript_policy
from lib.policies.noise import seeded_noise_and_time
from lib.policies.policy_fn import make_policy_fn
from lib.rl.ript import (
    StateOutcomeHistory,
    collect_informative_groups,
    init_state_key,
    minibatch_order,
    rollout_groups,
    window_batch,
    windows_with_advantages,
)
from lib.run.config import ConfigError, load_config
from lib.run.keys import stable_key
from lib.run.schemas import RIPTConfig, validate_config


# YAML config + CLI overrides + validation, replacing the hard-coded config.
def load_config_from_yaml(path: Path, overrides: list[str]) -> DictConfig:
    """The schema's defaults (lib/run/schemas.py), then the YAML file, then `key=value` overrides."""
    config = load_config(RIPTConfig, path, overrides)
    validate_config(config)
    return config


class InitialStateDataset:
    """Every (task, init state) of the chosen LIBERO tasks, drawn at random in batches; with
    `world` > 1, this rank's share of them (New in stage 10)."""

    def __init__(self, benchmark: str, task_names: list[str] | None, seed: int, rank: int = 0, world: int = 1) -> None:
        suite = get_suite(benchmark)
        self.states = []
        for task_id in range(suite.n_tasks):
            task = suite.get_task(task_id)
            if task_names is None or task.name in task_names:
                for index, init_state in enumerate(suite.get_task_init_states(task_id)):
                    self.states.append(
                        {
                            "task_id": task_id,
                            "init_index": index,
                            "init_state": np.asarray(init_state),
                            "instruction": task.language,
                        }
                    )
        if not self.states:
            raise ValueError(f"none of the tasks {task_names} is in {benchmark}")
        self.states = self.states[rank::world]  # New in stage 10: each rank its own init states
        self.rng = random.Random(seed + rank)

    def sample(self, n: int) -> list[dict]:
        return [dict(state) for state in self.rng.sample(self.states, n)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A config file and overrides instead of a few fixed flags.
    parser.add_argument(
        "--config", "--config_path", dest="config", type=Path, default=Path("configs/debug_train_pi0.yaml")
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.iterations=2")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # Load and validate the YAML config.
    try:
        config = load_config_from_yaml(args.config, args.overrides)
    except ConfigError as error:
        print(f"✗ config error: {error}", file=sys.stderr)
        return 2
    # New in stage 10: the original's setup_distributed(). `cpu=` because a launcher config with
    # `use_cpu: true` starts processes that never connect on a machine without a GPU (docs/dependencies.md).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    # New in stage 10: `accelerator.print` prints on the main process only.
    accelerator.print(f"✓ config loaded from {args.config} and validated")
    accelerator.print(f"processes: {world} ({accelerator.distributed_type}), device: {accelerator.device}")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    accelerator.print(f"config: {OmegaConf.to_container(config)}")

    # Policy: the flag-conditioned pi0 and its processors.
    device = accelerator.device.type
    policy, preprocessor, postprocessor, _ = make_ript_policy(config.model, device)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    # New in stage 10: DDP-wrap the policy; `unwrap_model` is the original's get_model_from_ddp().
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)
    dataset = InitialStateDataset(config.env.benchmark, config.env.task_names, config.seed, rank, world)
    history = StateOutcomeHistory(skip_after=config.rl.skip_after, skip_for=config.rl.skip_for)
    parameters = sum(p.numel() for p in policy.parameters())
    accelerator.print(f"{len(dataset.states)} init states on rank 0; policy with {parameters} parameters")

    progress_file = output_dir / "progress.json"
    progress = {"config": OmegaConf.to_container(config), "iterations": []}
    envs = VectorLiberoRollout(
        config.env.benchmark,
        config.env.num_envs,
        config.env.camera_size,
        config.env.max_steps,
        config.env.replan_steps,
        seed=stable_key("simulators", config.seed, rank),
        settle_steps=config.env.settle_steps,
        # New in stage 10: each rank's simulators render on that rank's GPU, not all on EGL's default one.
        render_gpu_device_id=torch.cuda.current_device() if torch.cuda.is_available() else -1,
    )
    all_results = []  # every episode rolled out in the current iteration
    try:
        for iteration in range(1, config.train.iterations + 1):
            # Rollouts with smart sampling: keep only groups whose K outcomes differ.
            started = time.perf_counter()
            all_results.clear()
            kept, stats = collect_informative_groups(
                lambda: dataset.sample(config.rl.states_per_draw),
                lambda states: rollout_groups(envs, policy_fn, states, config.rl.rollouts_per_state, all_results),
                init_state_key,
                history,
                config.rl.target_groups,
                config.rl.max_draw_rounds,
            )
            rollout_time = time.perf_counter() - started

            # Batched training on the kept rollouts' windows, weighted by leave-one-out advantage.
            windows, advantages = windows_with_advantages(kept)
            losses = []
            # New in stage 10: every rank must run the same number of DDP steps; the rank with the
            # most windows sets it, the others cycle through theirs; no update if a rank has none.
            counts = accelerator.gather(torch.tensor([len(windows)], device=accelerator.device))
            if int(counts.min()) > 0:
                unwrapped.train()
                steps = config.rl.update_epochs * math.ceil(int(counts.max()) / config.rl.minibatch_size)
                order_seed = stable_key("minibatch order", config.seed, iteration, rank)
                for step, picked in enumerate(
                    minibatch_order(len(windows), steps, config.rl.minibatch_size, order_seed)
                ):
                    batch, batch_advantages = window_batch(windows, advantages, picked, config.model.chunk_size)
                    batch = preprocessor(batch)
                    noise, flow_time = seeded_noise_and_time(
                        unwrapped.model,
                        len(picked),
                        stable_key("update noise", config.seed, iteration, step, rank),
                        accelerator.device,
                    )
                    with accelerator.autocast():
                        loss, _ = policy(
                            batch,
                            batch_advantages.to(accelerator.device),
                            noise,
                            flow_time,
                            objective=config.rl.objective,
                            alpha=config.rl.alpha,
                        )
                    accelerator.backward(loss)
                    accelerator.clip_grad_norm_(policy.parameters(), config.optim.grad_clip_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())

            # New in stage 10: statistics summed (loss averaged) over all ranks.
            successes, episodes, groups, dropped_success, dropped_failure = accelerator.reduce(
                torch.tensor(
                    [
                        sum(r.success for r in all_results),
                        len(all_results),
                        len(kept),
                        stats.dropped_all_success,
                        stats.dropped_all_failure,
                    ],
                    device=accelerator.device,
                ),
                "sum",
            ).tolist()
            record = {
                "iteration": iteration,
                "success_rate": successes / max(episodes, 1),
                "episodes": episodes,
                "groups_kept": groups,
                "dropped_all_success": dropped_success,
                "dropped_all_failure": dropped_failure,
                "update_steps": len(losses),
                "loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item() if losses else None,
                "rollout_time_s": rollout_time,
            }
            progress["iterations"].append(record)
            if accelerator.is_main_process:
                progress_file.write_text(json.dumps(progress, indent=2))
            accelerator.print(
                f"iteration {iteration}/{config.train.iterations}: success {record['success_rate']:.2f}, "
                f"{groups} groups kept, {len(losses)} updates, loss {record['loss']}, "
                f"rollout {rollout_time:.1f} s"
            )
    finally:
        envs.close()
    accelerator.print(f"progress written to {progress_file}")
    # New in stage 10: the original's cleanup_distributed(); an orderly end (gloo aborts at exit on
    # Python 3.12 without it).
    accelerator.wait_for_everyone()
    policy = optimizer = unwrapped = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
