"""One RIPT iteration end to end, for any rollout backend: rollouts with dynamic sampling, the
learning rate, the update, the statistics over all ranks, and between iterations the checkpoint and
the stop check. Both RL drivers only wire their backend, policy and config into `RIPTIteration`:
`train_ript_pi0.py` (LIBERO, any number of ranks) and `ript_soft_arm.py` (the simulated soft arm).

Its record has one set of names for both: `record[name]` in progress files, `ript/<name>` in the
metrics and trackers (`metrics_of`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import gather_object

from lib.envs.vector_rollout import TimedPolicy
from lib.policies.lora import base_policy
from lib.rl.critic import critic_window_advantages
from lib.rl.objectives import exploration_noise, rollout_noise
from lib.rl.ript import (
    EpisodeOutcome,
    RIPTProgress,
    RolloutBackend,
    StateOutcomeHistory,
    collect_iteration,
    iteration_statistics,
    run_update,
    set_iteration_lr,
    success_reward,
    windows_with_advantages,
)
from lib.run.checkpoint import save_policy_checkpoint
from lib.run.faults import raising_at_first_call_if_injected
from lib.run.guards import GracefulStop, NonFiniteGuard

ROLLOUT_KEYS = (
    "success_rate",
    "episodes",
    "groups_kept",
    "dropped_all_success",
    "dropped_all_failure",
    "explored_groups",
    "explored_successes",
)
ADVANTAGE_KEYS = ("advantage_mean", "advantage_std", "advantage_positive_fraction", "skipped_states")
UPDATE_KEYS = ("update_steps", "lr", "nonfinite_skipped", "loss")
MEASURED_KEYS = ("rollout_time_s", "inference_time_s", "update_time_s", "env_steps_per_s", "rss_gib", "gpu_peak_gib")
# Every iteration's record holds these, plus `update_<term>` for each term of the objective's loss.
RECORD_KEYS = (
    *ROLLOUT_KEYS,
    *UPDATE_KEYS,
    *MEASURED_KEYS,
    "worker_restarts",
    *ADVANTAGE_KEYS,
    "critic_explained_variance",
)
# Unset (None, left out of the metrics) where they do not apply: no update ran, no critic was fitted.
OPTIONAL_KEYS = ("loss", "critic_explained_variance")


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The tracker / metrics.jsonl form of an iteration record: `ript/<name>`, unset values left out."""
    return {f"ript/{key}": value for key, value in record.items() if value is not None}


@dataclass
class IterationResult:
    record: dict[str, Any]  # the iteration's figures, one set of names (module docstring)
    episodes: list[EpisodeOutcome]  # every episode rolled out (frames of the first of each round if recorded)


class RIPTIteration:
    """The RIPT loop's body, wired once per run. `policy` and `optimizer` are prepared by
    `accelerator`; `policy_fn` is the rollouts' batched policy function (its call time is reported as
    `inference_time_s`); `draw_states()` returns the next init states of this rank, `key_of(state)`
    names a state in the outcome history, `reward_of(episode)` scores an episode; `rl`, `optim` are
    the config sections; `demos` the demonstration frames of `rl.demo_dataset` (lib/rl/demos.py).
    `progress` (iterations done, states drawn) and `history` are what a checkpoint restores besides
    weights, optimizer and RNG; `stop` a signal handler the driver already holds (one is made
    otherwise)."""

    def __init__(
        self,
        accelerator: Any,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        preprocessor: Callable[[dict[str, Any]], dict[str, Any]],
        policy_fn: Callable,
        draw_states: Callable[[], list[dict[str, Any]]],
        key_of: Callable[[dict[str, Any]], Hashable],
        rl: Any,
        optim: Any,
        seed: int,
        iterations: int,
        reward_of: Callable[[EpisodeOutcome], float] = success_reward,
        stop: GracefulStop | None = None,
        demos: Any | None = None,
    ) -> None:
        self.accelerator, self.policy, self.optimizer, self.preprocessor = accelerator, policy, optimizer, preprocessor
        self.draw_states, self.key_of, self.reward_of = draw_states, key_of, reward_of
        self.rl, self.optim, self.seed, self.iterations, self.demos = rl, optim, seed, iterations, demos
        self.policy_fn = policy_fn if isinstance(policy_fn, TimedPolicy) else TimedPolicy(policy_fn)
        self.unwrapped = base_policy(accelerator.unwrap_model(policy))  # the LeRobot policy, also under LoRA
        self.history = StateOutcomeHistory(skip_after=rl.skip_after, skip_for=rl.skip_for)
        self.progress = RIPTProgress(accelerator.process_index, accelerator.num_processes)
        self.nonfinite = NonFiniteGuard(rl.max_nonfinite_steps, "rl.max_nonfinite_steps")
        self.stop = stop or GracefulStop()  # SIGTERM/SIGINT: the run saves after its iteration and exits 0
        self.process = psutil.Process()

    def run(self, iteration: int, backend: RolloutBackend, record_first: bool = False) -> IterationResult:
        """Iteration `iteration` (1-based) on `backend`'s simulators: collect, set the learning rate,
        update, and the record. `record_first` keeps each round's first episode's frames (a video)."""
        accelerator, rl = self.accelerator, self.rl
        started = time.perf_counter()
        self.policy_fn.pop_seconds()  # calls before this iteration (an evaluation) are not its inference
        policy_fn = raising_at_first_call_if_injected(self.policy_fn, accelerator.process_index, iteration)
        with exploration_noise(self.unwrapped, rl):  # Flow-Noise sampling for flow_noise
            rollouts = collect_iteration(
                rl,
                self.draw_states,
                backend,
                policy_fn,
                self.history,
                self.key_of,
                record_first,
                self.reward_of,
                exploring=lambda: rollout_noise(self.unwrapped, rl.explore_std),
            )
        rollout_time = time.perf_counter() - started
        inference_time = self.policy_fn.pop_seconds()

        critic_figures = {"critic_explained_variance": None}
        if rl.advantage == "critic":  # one advantage per window, from a critic fitted on this iteration
            windows, advantages, critic_figures = critic_window_advantages(
                rollouts.kept,
                rollouts.rolled,
                rl.positive_quantile,
                rl.critic_ridge,
            )
        else:
            windows, advantages = windows_with_advantages(rollouts.kept)
        lr = set_iteration_lr(self.optimizer, self.optim, iteration, self.iterations)  # warm-up, decay
        terms: dict[str, list[torch.Tensor]] = {}
        losses = run_update(
            accelerator,
            self.policy,
            self.optimizer,
            self.preprocessor,
            windows,
            advantages,
            rl,
            self.optim.grad_clip_norm,
            self.seed,
            iteration,
            self.nonfinite,
            terms,
            self.demos,
        )
        update_time = time.perf_counter() - started - rollout_time

        statistics = iteration_statistics(accelerator, rollouts, advantages)  # summed over all ranks
        record = {
            **{key: statistics[key] for key in ROLLOUT_KEYS},
            "update_steps": len(losses),
            "lr": lr,
            "nonfinite_skipped": self.nonfinite.pop_skipped(),  # update steps skipped (non-finite gradient)
            "loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item() if losses else None,
            # the objective's own terms (cfg_rl's branch losses, flow_noise's approx_kl, ...), this rank's
            **{
                f"update_{name}": torch.stack(values).float().mean().item()
                for name, values in terms.items()
                if name != "loss"
            },
            "rollout_time_s": rollout_time,
            "inference_time_s": inference_time,
            "update_time_s": update_time,
            "env_steps_per_s": statistics["env_steps"] / max(rollout_time, 1e-9),
            "worker_restarts": backend.worker_restarts,  # simulators replaced so far (died or hung)
            "rss_gib": self.process.memory_info().rss / 2**30,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            **{key: statistics[key] for key in ADVANTAGE_KEYS},
            **critic_figures,
        }
        self.progress.iteration = iteration
        return IterationResult(record, rollouts.episodes)

    def save(self, output_dir: str | Path, extras: list[Any], keep_last: int) -> Path:
        """An atomic checkpoint of the iterations done (all ranks call): every rank's outcome history
        and sampler position go into it."""
        self.history.merge(gather_object([self.history.state_dict()]))
        self.progress.gather_draws(gather_object)  # ranks draw different numbers of batches
        return save_policy_checkpoint(
            self.accelerator, output_dir, self.progress.iteration, self.policy, extras, keep_last
        )

    def should_stop(self) -> bool:
        """Whether a stop signal reached any rank (a collective: every rank decides the same)."""
        return self.stop.should_stop(self.accelerator)
