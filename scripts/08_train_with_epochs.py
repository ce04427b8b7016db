"""Stage 08 of the RIPT reproduction: the base script (see scripts/STAGES.md).

RL post-training of pi0 in LIBERO in one process: a hard-coded config (the dataclass
`AdvancedTrainingConfig`), a simple `InitialStateDataset`, print output and a JSON
progress file. Every iteration ("epoch") draws init
states, rolls out K episodes from each, keeps the groups whose outcomes differ (smart sampling),
and trains on their windows in minibatches with the CFG-RL objective. The later stages add one
capability each: 09 YAML configs, 10 multi-process, 11 logging, 12 a PyTorch dataset, 13
checkpoints and recovery; `train_ript_pi0.py` is the final script.

    python scripts/08_train_with_epochs.py --iterations 2 --max_steps 6
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

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
from lib.run.keys import stable_key
from lib.run.schemas import EnvConfig, ModelConfig, OptimConfig, RIPTConfig, RLConfig, TrainConfig

TASK = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"


@dataclass
class AdvancedTrainingConfig(RIPTConfig):
    """The hard-coded training config (the original's AdvancedTrainingConfig): the tiny pi0 on one
    LIBERO task, one simulator, short episodes. The fields are the shared schema's
    (lib/run/schemas.py), which stage 09 fills from a YAML file instead."""

    output_dir: str = "outputs/stage08"
    seed: int = 0
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(pretrained="tiny", chunk_size=4, num_inference_steps=2, image_size=64)
    )
    env: EnvConfig = field(
        default_factory=lambda: EnvConfig(
            benchmark="libero_spatial", task_names=[TASK], num_envs=1, camera_size=64, max_steps=6, replan_steps=3
        )
    )
    rl: RLConfig = field(
        default_factory=lambda: RLConfig(
            rollouts_per_state=2,
            states_per_draw=1,
            target_groups=1,
            max_draw_rounds=1,
            update_epochs=1,
            minibatch_size=4,
        )
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(iterations=2))


class InitialStateDataset:
    """Every (task, init state) of the chosen LIBERO tasks, drawn at random in batches."""

    def __init__(self, benchmark: str, task_names: list[str] | None, seed: int) -> None:
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
        self.rng = random.Random(seed)

    def sample(self, n: int) -> list[dict]:
        return [dict(state) for state in self.rng.sample(self.states, n)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=6, help="episode length limit")
    parser.add_argument("--tokenizer", default="artifacts/tokenizer")
    parser.add_argument("--output_dir", default="outputs/stage08")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    config = AdvancedTrainingConfig(output_dir=args.output_dir, seed=args.seed)
    config.model.tokenizer = args.tokenizer
    config.env.max_steps = args.max_steps
    config.train.iterations = args.iterations
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    print(f"config: {asdict(config)}")

    # Policy: the flag-conditioned pi0 and its processors.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, preprocessor, postprocessor, _ = make_ript_policy(config.model, device)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor)
    dataset = InitialStateDataset(config.env.benchmark, config.env.task_names, config.seed)
    history = StateOutcomeHistory(skip_after=config.rl.skip_after, skip_for=config.rl.skip_for)
    print(f"{len(dataset.states)} init states; policy with {sum(p.numel() for p in policy.parameters())} parameters")

    progress_file = output_dir / "progress.json"
    progress = {"config": asdict(config), "iterations": []}
    envs = VectorLiberoRollout(
        config.env.benchmark,
        config.env.num_envs,
        config.env.camera_size,
        config.env.max_steps,
        config.env.replan_steps,
        seed=config.seed,
        settle_steps=config.env.settle_steps,
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
            if windows:
                policy.train()
                steps = config.rl.update_epochs * math.ceil(len(windows) / config.rl.minibatch_size)
                order_seed = stable_key("minibatch order", config.seed, iteration)
                for step, picked in enumerate(
                    minibatch_order(len(windows), steps, config.rl.minibatch_size, order_seed)
                ):
                    batch, batch_advantages = window_batch(windows, advantages, picked, config.model.chunk_size)
                    batch = preprocessor(batch)
                    noise, flow_time = seeded_noise_and_time(
                        policy.model,
                        len(picked),
                        stable_key("update noise", config.seed, iteration, step),
                        device,
                    )
                    loss, _ = policy(
                        batch,
                        batch_advantages.to(device),
                        noise,
                        flow_time,
                        objective=config.rl.objective,
                        alpha=config.rl.alpha,
                    )
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.optim.grad_clip_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())

            record = {
                "iteration": iteration,
                "success_rate": float(np.mean([r.success for r in all_results])) if all_results else 0.0,
                "episodes": len(all_results),
                "groups_kept": len(kept),
                "dropped_all_success": stats.dropped_all_success,
                "dropped_all_failure": stats.dropped_all_failure,
                "update_steps": len(losses),
                "loss": float(np.mean(losses)) if losses else None,
                "rollout_time_s": rollout_time,
            }
            progress["iterations"].append(record)
            progress_file.write_text(json.dumps(progress, indent=2))
            print(
                f"iteration {iteration}/{config.train.iterations}: success {record['success_rate']:.2f}, "
                f"{len(kept)} groups kept, {len(losses)} updates, loss {record['loss']}, "
                f"rollout {rollout_time:.1f} s"
            )
    finally:
        envs.close()
    print(f"progress written to {progress_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
