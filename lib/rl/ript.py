"""RIPT: RL post-training from success/failure rollouts, the simulator- and model-independent part.

- `leave_one_out_advantages`: K rollouts per init state; A_i = R_i - mean of the other K-1.
- `StateOutcomeHistory` + `collect_informative_groups`: dynamic sampling. Groups whose K rollouts
  all succeed or all fail carry no signal and are dropped; more init states are drawn until the
  batch is full or a round limit is hit. States solved K/K several times in a row are skipped for
  a while, never all of them at once (a fully solved task cannot loop forever).
- `rollout_groups`, `windows_with_advantages`, `minibatch_order`, `window_batch`: K episodes per
  state from a rollout backend (LIBERO or the soft arm), then the policy calls of the kept
  rollouts as training windows with their rollout's advantage.
- The engine (`collect_iteration`, `run_update`, `reduce_sums`): one RIPT iteration from the `rl`
  config section, used by `train_ript_pi0.py` and `ript_soft_arm.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from lerobot.utils.constants import ACTION
from torch import Tensor

from lib.envs.vector_rollout import PolicyFn, Window
from lib.policies.lora import base_policy
from lib.policies.noise import keyed_noise_and_time
from lib.policies.policy_fn import observations_to_batch
from lib.rl.demos import DEMO_ADVANTAGE, demo_minibatch, demo_noise_keys, join_batches
from lib.run.guards import NonFiniteGuard
from lib.run.keys import stable_key
from lib.run.optim import cosine_with_warmup


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """(groups, K) rewards -> (groups, K) advantages R_i - mean_{j != i} R_j (K >= 2)."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (groups, K) with K >= 2, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


def is_informative(group_rewards: Tensor) -> bool:
    """A group teaches something only if its K outcomes differ."""
    return bool((group_rewards != group_rewards[0]).any())


@dataclass
class StateOutcomeHistory:
    """Per init-state record: how many times in a row all K rollouts succeeded, and for how many
    more draws the state is skipped once that reached `skip_after`."""

    skip_after: int = 3
    skip_for: int = 5
    solved_streak: dict[Hashable, int] = field(default_factory=dict)
    skips_left: dict[Hashable, int] = field(default_factory=dict)

    def record(self, key: Hashable, group_rewards: Tensor) -> None:
        solved = bool((group_rewards > 0).all())
        streak = self.solved_streak.get(key, 0) + 1 if solved else 0
        self.solved_streak[key] = streak
        if streak >= self.skip_after:
            self.skips_left[key] = self.skip_for
            self.solved_streak[key] = 0

    def take_skip(self, key: Hashable) -> bool:
        """True (and one skip used up) while `key` is resting after repeated full success."""
        left = self.skips_left.get(key, 0)
        if left <= 0:
            return False
        self.skips_left[key] = left - 1
        return True

    def merge(self, state_dicts: list[dict[str, Any]]) -> None:
        """Take in the records of other histories (e.g. every rank's, which saw other states)."""
        for state in state_dicts:
            other = StateOutcomeHistory()
            other.load_state_dict(state)
            self.solved_streak.update(other.solved_streak)
            self.skips_left.update(other.skips_left)

    # Plain data for JSON: a tuple key (LIBERO's (task, init index)) is written as a list and read
    # back as a tuple; a scalar key (the soft arm's seed) stays as it is.
    def state_dict(self) -> dict[str, Any]:
        def as_json(k: Hashable) -> Any:
            return list(k) if isinstance(k, tuple) else k

        return {
            "solved_streak": [[as_json(k), v] for k, v in self.solved_streak.items()],
            "skips_left": [[as_json(k), v] for k, v in self.skips_left.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def key(k: Any) -> Hashable:
            return tuple(k) if isinstance(k, list) else k

        self.solved_streak = {key(k): v for k, v in state["solved_streak"]}
        self.skips_left = {key(k): v for k, v in state["skips_left"]}


class RIPTProgress:
    """Iterations done and init-state batches drawn (the sampler position): saved with the training
    state (`lib.run.checkpoint.checkpoint_as_json`), so a resumed run draws the next batch in order.

    Dynamic sampling makes ranks draw different numbers of batches, so the checkpoint keeps every
    rank's count: call `gather_draws` on every rank before saving (the main process writes)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.iteration = 0
        self.draws = 0  # this rank's
        self.draws_by_rank = [0] * world

    def gather_draws(self, gather_object: Callable[[list[int]], list[int]]) -> None:
        """Collect every rank's draw count (`accelerate.utils.gather_object`; a collective)."""
        self.draws_by_rank = gather_object([self.draws])

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "draws_by_rank": self.draws_by_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.draws_by_rank = state["iteration"], state["draws_by_rank"]
        if len(self.draws_by_rank) == self.world:
            self.draws = self.draws_by_rank[self.rank]
        else:
            # Another number of processes shards the init states differently: no exact position
            # exists, so every rank goes on from the furthest one (no state is drawn twice early).
            self.draws = max(self.draws_by_rank)
            print(
                f"resuming a {len(self.draws_by_rank)}-process run on {self.world} processes: "
                f"the init-state order continues from draw {self.draws}, not bit-exactly"
            )


@dataclass
class CollectionStats:
    rounds: int = 0
    groups_rolled_out: int = 0
    dropped_all_success: int = 0
    dropped_all_failure: int = 0
    skipped_states: int = 0
    explored_groups: int = 0  # all-failure groups rolled out again with exploration noise
    explored_successes: int = 0  # successes among those re-rolled episodes


def collect_informative_groups(
    draw_states: Callable[[], list[Any]],
    rollout_groups: Callable[[list[Any]], Tensor],
    key_of: Callable[[Any], Hashable],
    history: StateOutcomeHistory,
    target_groups: int,
    max_rounds: int,
    keep_failed: bool = False,
    explore: Callable[[list[Any]], Tensor] | None = None,
    max_groups: int | None = None,
    rolled: list[tuple[Any, Tensor]] | None = None,
) -> tuple[list[tuple[Any, Tensor]], CollectionStats]:
    """Draw init states, roll out K episodes each, keep the informative groups.

    `draw_states()` returns the next batch of init states; `rollout_groups(states)` returns their
    (len(states), K) rewards. States resting in `history` are skipped unless every state of the
    draw is resting (then all are rolled out: the loop always makes progress). Stops when
    `target_groups` informative groups are kept or after `max_rounds` draws.

    `keep_failed`: a group whose rollouts all failed is kept too (a per-window critic ranks its
    windows). `explore(states)`: each state of a round whose group all failed is rolled out once
    more (K episodes of copies of the states, with exploration noise), a group of its own that is
    kept or dropped by the same rule. `max_groups`: the groups rolled out (re-rolls included) stop at
    this many (a draw is cut to what fits: an episode budget of max_groups x K). `rolled` receives
    every group rolled out.
    """
    kept: list[tuple[Any, Tensor]] = []
    stats = CollectionStats()

    def fits(states: list[Any]) -> list[Any]:
        """The first of `states` that the group budget still admits."""
        return states if max_groups is None else states[: max(0, max_groups - stats.groups_rolled_out)]

    def sort(states: list[Any], rewards: Tensor, explored: bool) -> list[Any]:
        """Keep or drop each group; the states whose groups all failed."""
        failed = []
        stats.groups_rolled_out += len(states)
        for state, group in zip(states, rewards, strict=True):
            if rolled is not None:
                rolled.append((state, group))
            if explored:
                stats.explored_groups += 1
                stats.explored_successes += int((group > 0).sum())
            else:
                history.record(key_of(state), group)
            if is_informative(group) or (keep_failed and not bool((group > 0).any())):
                kept.append((state, group))
            elif bool((group > 0).all()):
                stats.dropped_all_success += 1
            else:
                stats.dropped_all_failure += 1
            if not bool((group > 0).any()):
                failed.append(state)
        return failed

    while len(kept) < target_groups and stats.rounds < max_rounds:
        stats.rounds += 1
        drawn = draw_states()
        resting = [history.take_skip(key_of(state)) for state in drawn]
        states = [s for s, rest in zip(drawn, resting, strict=True) if not rest] if not all(resting) else drawn
        stats.skipped_states += len(drawn) - len(states)
        states = fits(states)
        if not states:
            if max_groups is not None and stats.groups_rolled_out >= max_groups:
                break
            continue
        failed = fits(sort(states, rollout_groups(states), explored=False))
        if explore is not None and failed:
            copies = [dict(state) for state in failed]
            sort(copies, explore(copies), explored=True)
    return kept[:target_groups] if len(kept) > target_groups else kept, stats


# --- Rollout groups -> training windows ----------------------------------------------------------


def init_state_key(state: dict[str, Any]) -> tuple[int, int]:
    """History key of an init state: (task id, init-state index)."""
    return int(state["task_id"]), int(state["init_index"])


def success_reward(episode: Any) -> float:
    """The original's reward: 1 for a success, 0 otherwise."""
    return float(episode.success)


def rollout_groups(
    envs: Any,
    policy_fn: Callable,
    states: list[dict[str, Any]],
    k: int,
    sink: list,
    record_first: bool = False,
    reward_of: Callable[[Any], float] = success_reward,
) -> Tensor:
    """K episodes from each init state in `envs` (a `VectorLiberoRollout`); each state keeps its
    episodes as `state["episodes"]`, every result is appended to `sink`; (len(states), K) rewards,
    `reward_of(episode)` each (> 0 exactly for a success: the history counts solved states by it).
    `record_first` keeps the frames of the first episode (for a video)."""
    requests = [
        dict(state, record=record_first and i == 0) for i, state in enumerate(s for s in states for _ in range(k))
    ]
    results = envs.run(requests, policy_fn)
    sink.extend(results)
    for index, state in enumerate(states):
        state["episodes"] = results[index * k : (index + 1) * k]
    return torch.tensor([reward_of(r) for r in results], dtype=torch.float32).view(len(states), k)


def windows_with_advantages(kept: list[tuple[dict[str, Any], Tensor]]) -> tuple[list[Any], list[float]]:
    """Every policy call (window) of every kept rollout, with its rollout's leave-one-out advantage."""
    windows: list[Any] = []
    advantages: list[float] = []
    for state, rewards in kept:
        for episode, advantage in zip(state["episodes"], leave_one_out_advantages(rewards[None])[0], strict=True):
            windows.extend(episode.windows)
            advantages.extend([float(advantage)] * len(episode.windows))
    return windows, advantages


def minibatch_order(num_windows: int, steps: int, minibatch_size: int, seed: int) -> list[list[int]]:
    """`steps` minibatches of window indices: shuffled passes over all windows, repeated as needed
    (a rank with fewer windows than others cycles through its own)."""
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * minibatch_size / num_windows)
    order = torch.cat([torch.randperm(num_windows, generator=generator) for _ in range(passes)]).tolist()
    return [order[i * minibatch_size : (i + 1) * minibatch_size] for i in range(steps)]


def window_batch(
    windows: list[Any], advantages: list[float], picked: list[int], chunk_size: int
) -> tuple[dict[str, Any], Tensor]:
    """A raw policy batch (before the pre-processor) of the picked windows: observations and the
    chunk each produced (steps past the executed ones marked `action_is_pad`); and their advantages.
    What the sampling recorded (`Window.extras`) is `window_extras`'s, added after pre-processing."""
    batch = observations_to_batch([windows[i].observation for i in picked])
    batch[ACTION] = torch.from_numpy(np.stack([windows[i].actions for i in picked]))
    executed = torch.tensor([windows[i].executed for i in picked])
    batch["action_is_pad"] = torch.arange(chunk_size)[None] >= executed[:, None]
    return batch, torch.tensor([advantages[i] for i in picked])


def window_extras(windows: list[Window], picked: list[int], device: Any) -> dict[str, Tensor]:
    """The picked windows' sampling records (`Window.extras`) stacked into tensors on `device`."""
    keys = windows[picked[0]].extras.keys()
    return {key: torch.from_numpy(np.stack([windows[i].extras[key] for i in picked])).to(device) for key in keys}


# --- The engine: one RIPT iteration from the `rl` config section ----------------------------------


class EpisodeOutcome(Protocol):
    """What a rollout backend reports of one episode."""

    success: bool
    length: int
    windows: list[Window]
    frames: list[np.ndarray]


class RolloutBackend(Protocol):
    """Simulators that roll out one episode per request with one batched policy call per control
    step (`lib.envs.libero.rollout.VectorLiberoRollout`, `lib.envs.soft_arm.sim.SoftArmVectorRollout`). A request is
    an init state (a dict) plus `record` to keep its frames; results come back in request order."""

    def run(
        self, requests: list[dict[str, Any]], policy_fn: PolicyFn, progress: Callable[[int], None] | None = None
    ) -> Sequence[EpisodeOutcome]: ...


# What makes an RL run the experiment it is: a resume may not change them (`lib.run.checkpoint.RunIdentity`).
RL_IDENTITY_KEYS = [
    "rl.objective",
    "model.guidance_weight",
    "rl.advantage",
    "rl.explore_std",
    "rl.demo_dataset",
]


def window_noise_keys(
    seed: int,
    iteration: int,
    step: int,
    picked: list[int],
    *,
    minibatch_size: int,
    num_windows: int,
    rank: int = 0,
) -> list[int]:
    """The flow-matching noise keys (`lib.policies.noise.keyed_noise_and_time`) of update step `step`'s picked
    windows: one per window and pass over the windows (`minibatch_order`), so a window draws the
    same noise and time whatever minibatch or accumulation step it falls in, and a resumed run
    draws what the uninterrupted one drew."""
    return [
        stable_key("window noise", seed, iteration, rank, position // num_windows, window)
        for position, window in enumerate(picked, start=step * minibatch_size)
    ]


def set_iteration_lr(optimizer: torch.optim.Optimizer, optim: Any, iteration: int, iterations: int) -> float:
    """Set and return the learning rate of RL iteration `iteration` (1-based) of `iterations`:
    `optim.lr` after a linear warm-up over `optim.warmup_iterations`, then constant or a cosine
    decay to `optim.decay_lr`. A function of the iteration alone, so a resumed run sets what the
    uninterrupted one set and nothing is saved for it."""
    final_ratio = 1.0 if optim.decay_lr is None else optim.decay_lr / optim.lr
    # Counted from 0, the last iteration is iterations - 1: it runs at `decay_lr`.
    lr = optim.lr * cosine_with_warmup(optim.warmup_iterations, iterations - 1, final_ratio)(iteration - 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def minibatch_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """Seed of the window order of `iteration`'s update on `rank`."""
    return stable_key("minibatch order", seed, iteration, rank)


@dataclass
class IterationRollouts:
    kept: list[tuple[dict[str, Any], Tensor]]  # informative groups: (init state with its episodes, K rewards)
    stats: CollectionStats
    episodes: list[EpisodeOutcome] = field(default_factory=list)  # every episode rolled out
    rolled: list[tuple[dict[str, Any], Tensor]] = field(default_factory=list)  # every group, `kept` among them


def collect_iteration(
    rl: Any,
    draw_states: Callable[[], list[dict[str, Any]]],
    backend: RolloutBackend,
    policy_fn: PolicyFn,
    history: StateOutcomeHistory,
    key_of: Callable[[dict[str, Any]], Hashable],
    record_first: bool = False,
    reward_of: Callable[[EpisodeOutcome], float] = success_reward,
    exploring: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> IterationRollouts:
    """One iteration's informative groups: `rl.rollouts_per_state` episodes per drawn state,
    dynamic sampling up to `rl.target_groups` groups in `rl.max_draw_rounds` draws and
    `rl.max_episodes` episodes. `record_first` keeps the frames of each round's first episode (for a
    video); `reward_of` scores an episode (the original's success reward unless the backend has a denser
    one). With `rl.advantage=critic` the groups that all failed are kept; with `rl.explore_std` > 0
    they are rolled out again within `exploring()` (the policy samples with exploration noise)."""
    k = rl.rollouts_per_state
    episodes: list[EpisodeOutcome] = []
    rolled: list[tuple[dict[str, Any], Tensor]] = []

    def roll(states: list[dict[str, Any]]) -> Tensor:
        return rollout_groups(backend, policy_fn, states, k, episodes, record_first, reward_of)

    def explore(states: list[dict[str, Any]]) -> Tensor:
        with exploring():
            return rollout_groups(backend, policy_fn, states, k, episodes, False, reward_of)

    kept, stats = collect_informative_groups(
        draw_states,
        roll,
        key_of,
        history,
        rl.target_groups,
        rl.max_draw_rounds,
        keep_failed=rl.advantage == "critic",
        explore=explore if rl.explore_std > 0 and exploring is not None else None,
        max_groups=None if rl.max_episodes is None else rl.max_episodes // k,
        rolled=rolled,
    )
    return IterationRollouts(kept, stats, episodes, rolled)


def run_update(
    accelerator: Any,
    policy: Any,
    optimizer: torch.optim.Optimizer,
    preprocessor: Callable[[dict[str, Any]], dict[str, Any]],
    windows: list[Window],
    advantages: list[float],
    rl: Any,
    grad_clip_norm: float,
    seed: int,
    iteration: int,
    nonfinite: NonFiniteGuard | None = None,
    diagnostics: dict[str, list[Tensor]] | None = None,
    demos: Any | None = None,
) -> list[Tensor]:
    """The policy update of one iteration: `rl.update_epochs` passes of `rl.minibatch_size`
    windows with the `rl.objective` loss, an optimizer step every `rl.gradient_accumulation_steps`
    minibatches (and after the last); returns the minibatch losses (detached, not synchronised).
    With `nonfinite`, a step whose gradient is not finite is skipped (and counted there); with
    `diagnostics`, each step's loss terms (the objective's, e.g. flow_noise's `approx_kl` and
    `clip_fraction`) are appended there by name. With `demos` (a dataset of demonstration frames),
    each minibatch also holds `rl.demos_per_minibatch` of them as forced positives (lib/rl/demos.py).

    `policy` is the (prepared) policy whose `forward(batch, advantages, noise, time, objective,
    alpha, std, clip_epsilon)` gives the loss (lib/rl/objectives.py); what the sampling recorded in the
    windows (`Window.extras`, e.g. flow_noise's chains) joins the pre-processed batch. Every rank
    runs the same number of steps (the rank with the most windows sets it, the others cycle through
    theirs: DDP needs matching collectives); no rank updates if one has no window. Window order and
    flow-matching noise are functions of seed, iteration, rank and window (`window_noise_keys`), so
    a resumed run repeats the uninterrupted one, and accumulated minibatches compute the step of
    their union (for objectives whose loss is a mean over windows: all but advantage_filtered,
    which averages over its positive windows)."""
    counts = accelerator.gather(torch.tensor([len(windows)], device=accelerator.device))
    if int(counts.min()) == 0:
        return []
    unwrapped = base_policy(accelerator.unwrap_model(policy))  # the LeRobot policy, also inside a LoRA wrapper
    unwrapped.train()
    rank = accelerator.process_index
    steps = rl.update_epochs * math.ceil(int(counts.max()) / rl.minibatch_size)
    order = minibatch_order(len(windows), steps, rl.minibatch_size, minibatch_seed(seed, iteration, rank))
    accumulation = rl.gradient_accumulation_steps
    losses = []
    for step, picked in enumerate(order):
        window_start = step - step % accumulation
        window_size = min(accumulation, steps - window_start)  # minibatches in this optimizer step
        sync = step == window_start + window_size - 1
        batch, batch_advantages = window_batch(windows, advantages, picked, unwrapped.config.chunk_size)
        keys = window_noise_keys(
            seed, iteration, step, picked, minibatch_size=rl.minibatch_size, num_windows=len(windows), rank=rank
        )
        if demos is not None:
            count = rl.demos_per_minibatch
            batch = join_batches(batch, demo_minibatch(demos, count, seed, iteration, step, rank))
            batch_advantages = torch.cat([batch_advantages, torch.full((count,), DEMO_ADVANTAGE)])
            keys += demo_noise_keys(count, seed, iteration, step, rank)
        batch = {**preprocessor(batch), **window_extras(windows, picked, accelerator.device)}
        noise, flow_time = keyed_noise_and_time(unwrapped.model, keys, accelerator.device)
        # Gradients are all-reduced only on the step's last minibatch.
        with contextlib.nullcontext() if sync else accelerator.no_sync(policy), accelerator.autocast():
            loss, terms = policy(
                batch,
                batch_advantages.to(accelerator.device),
                noise,
                flow_time,
                objective=rl.objective,
                alpha=rl.alpha,
                std=rl.flow_noise_std,
                clip_epsilon=rl.clip_epsilon,
            )
            if nonfinite is not None:
                loss = nonfinite.inject(loss, step + 1)
            accelerator.backward(loss / window_size)
        if diagnostics is not None:
            for name, value in terms.items():
                diagnostics.setdefault(name, []).append(value.detach())
        losses.append(loss.detach())
        if not sync:
            continue
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), grad_clip_norm)
        if nonfinite is None or nonfinite.is_finite(grad_norm, step + 1):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def reduce_sums(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value summed over all ranks, in one collective (integers stay integers)."""
    summed = accelerator.reduce(
        torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=accelerator.device), "sum"
    ).tolist()
    return {
        key: int(total) if isinstance(value, int) else total
        for (key, value), total in zip(values.items(), summed, strict=True)
    }


def iteration_statistics(accelerator: Any, rollouts: IterationRollouts, advantages: list[float]) -> dict[str, float]:
    """Rollout, sampling and advantage statistics of an iteration over all ranks."""
    sums = reduce_sums(
        accelerator,
        {
            "successes": sum(int(e.success) for e in rollouts.episodes),
            "episodes": len(rollouts.episodes),
            "groups_kept": len(rollouts.kept),
            "dropped_all_success": rollouts.stats.dropped_all_success,
            "dropped_all_failure": rollouts.stats.dropped_all_failure,
            "skipped_states": rollouts.stats.skipped_states,
            "explored_groups": rollouts.stats.explored_groups,
            "explored_successes": rollouts.stats.explored_successes,
            "env_steps": sum(e.length for e in rollouts.episodes),
            "windows": len(advantages),
            "positive_windows": sum(int(a > 0) for a in advantages),
            "advantage_sum": float(sum(advantages)),
            "advantage_squares": float(sum(a * a for a in advantages)),
        },
    )
    count = max(sums["windows"], 1)
    mean = sums["advantage_sum"] / count
    return {
        "success_rate": sums["successes"] / max(sums["episodes"], 1),
        **{key: sums[key] for key in ("episodes", "groups_kept", "dropped_all_success", "dropped_all_failure")},
        "skipped_states": sums["skipped_states"],
        "explored_groups": sums["explored_groups"],
        "explored_successes": sums["explored_successes"],
        "env_steps": sums["env_steps"],
        "advantage_mean": mean,
        "advantage_std": math.sqrt(max(sums["advantage_squares"] / count - mean**2, 0.0)),
        "advantage_positive_fraction": sums["positive_windows"] / count,
    }
