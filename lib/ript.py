"""RIPT: RL post-training of pi0 from success/failure rollouts (DESIGN.md "RL (RIPT)").

- `leave_one_out_advantages`: K rollouts per init state; A_i = R_i - mean of the other K-1.
- `StateOutcomeHistory` + `collect_informative_groups`: dynamic sampling. Groups whose K rollouts
  all succeed or all fail carry no signal and are dropped; more init states are drawn until the
  batch is full or a round limit is hit. States solved K/K several times in a row are skipped for
  a while, never all of them at once (a fully solved task cannot loop forever).
- `PI0CFGPolicy`: pi0 conditioned on an optimality flag (a learned embedding added to the state
  token), trained with the CFG-RL objective L = 1[A > 0] L_fm(o=1) + alpha L_fm(o=null) (the two
  branches share noise and time, in one batched forward) and sampled with guidance weight w:
  v = v_null + w (v_cond - v_null). `advantage_filtered_loss` is the plain baseline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature, PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lib.libero import ACTION_DIM, AGENTVIEW_KEY, STATE_DIM, STATE_KEY, WRIST_KEY
from lib.pi0 import (
    MODEL_SIZES,
    CheckedLoadPolicy,
    SizedPI0Config,
    building_network,
    load_pi0_processors,
    load_tokenizer,
    make_pi0_policy,
    make_pi0_processors,
    resolve_pretrained,
    saved_model_size,
)
from lib.rollout import observations_to_batch

NULL_FLAG, OPTIMAL_FLAG = 0, 1
OBJECTIVES = ("cfg_rl", "advantage_filtered")


# --- Advantages and dynamic sampling (pure) ------------------------------------------------------


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

    def state_dict(self) -> dict[str, Any]:
        return {
            "solved_streak": [[list(k), v] for k, v in self.solved_streak.items()],
            "skips_left": [[list(k), v] for k, v in self.skips_left.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.solved_streak = {tuple(k): v for k, v in state["solved_streak"]}
        self.skips_left = {tuple(k): v for k, v in state["skips_left"]}


class RIPTProgress:
    """Iterations done and init-state batches drawn (the sampler position): checkpointed through
    `accelerator.register_for_checkpointing`, so a resumed run draws the next batch in order."""

    def __init__(self) -> None:
        self.iteration = 0
        self.draws = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration, "draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration, self.draws = state["iteration"], state["draws"]


@dataclass
class CollectionStats:
    rounds: int = 0
    groups_rolled_out: int = 0
    dropped_all_success: int = 0
    dropped_all_failure: int = 0
    skipped_states: int = 0


def collect_informative_groups(
    draw_states: Callable[[], list[Any]],
    rollout_groups: Callable[[list[Any]], Tensor],
    key_of: Callable[[Any], Hashable],
    history: StateOutcomeHistory,
    target_groups: int,
    max_rounds: int,
) -> tuple[list[tuple[Any, Tensor]], CollectionStats]:
    """Draw init states, roll out K episodes each, keep the informative groups.

    `draw_states()` returns the next batch of init states; `rollout_groups(states)` returns their
    (len(states), K) rewards. States resting in `history` are skipped unless every state of the
    draw is resting (then all are rolled out: the loop always makes progress). Stops when
    `target_groups` informative groups are kept or after `max_rounds` draws.
    """
    kept: list[tuple[Any, Tensor]] = []
    stats = CollectionStats()
    while len(kept) < target_groups and stats.rounds < max_rounds:
        stats.rounds += 1
        drawn = draw_states()
        resting = [history.take_skip(key_of(state)) for state in drawn]
        states = [s for s, rest in zip(drawn, resting, strict=True) if not rest] if not all(resting) else drawn
        stats.skipped_states += len(drawn) - len(states)
        if not states:
            continue
        rewards = rollout_groups(states)
        stats.groups_rolled_out += len(states)
        for state, group in zip(states, rewards, strict=True):
            history.record(key_of(state), group)
            if is_informative(group):
                kept.append((state, group))
            elif bool((group > 0).all()):
                stats.dropped_all_success += 1
            else:
                stats.dropped_all_failure += 1
    return kept[:target_groups] if len(kept) > target_groups else kept, stats


# --- The flag-conditioned pi0 --------------------------------------------------------------------


class PI0WithCondition(PI0Pytorch):
    """`PI0Pytorch` with an optimality flag (null / optimal) added to the state token, and
    classifier-free guidance at sampling. Only `embed_suffix` and `denoise_step` are extended."""

    def __init__(self, config: PI0Config, rtc_processor: Any = None) -> None:
        super().__init__(config, rtc_processor=rtc_processor)
        width = self.state_proj.out_features
        self.condition_embedding = nn.Embedding(2, width)
        nn.init.zeros_(self.condition_embedding.weight)  # starts as plain pi0 for either flag
        self._flags: Tensor | None = None
        self._guidance_weight: float | None = None

    @contextlib.contextmanager
    def conditioning(self, flags: Tensor | None, guidance_weight: float | None = None) -> Iterator[None]:
        """`flags` (B,) of NULL_FLAG / OPTIMAL_FLAG for `embed_suffix`; with `guidance_weight`,
        the batch holds [optimal half; null half] and `denoise_step` mixes the two velocities."""
        self._flags, self._guidance_weight = flags, guidance_weight
        try:
            yield
        finally:
            self._flags, self._guidance_weight = None, None

    def embed_suffix(self, state, noisy_actions, timestep):
        embs, pad_masks, att_masks, adarms_cond = super().embed_suffix(state, noisy_actions, timestep)
        if self._flags is None:
            return embs, pad_masks, att_masks, adarms_cond
        flag_embs = self.condition_embedding(self._flags.to(embs.device)).to(embs.dtype)
        embs = torch.cat([embs[:, :1] + flag_embs[:, None], embs[:, 1:]], dim=1)
        return embs, pad_masks, att_masks, adarms_cond

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        if self._guidance_weight is None:
            return super().denoise_step(state, prefix_pad_masks, past_key_values, x_t, timestep)
        # Both branches in one forward: the prefix (and its KV cache) was built on [cond; null].
        velocity = super().denoise_step(
            state, prefix_pad_masks, past_key_values, torch.cat([x_t, x_t]), torch.cat([timestep, timestep])
        )
        v_cond, v_null = velocity.chunk(2)
        return v_null + self._guidance_weight * (v_cond - v_null)

    @torch.no_grad()
    def sample_actions_guided(
        self,
        images,
        img_masks,
        lang_tokens,
        lang_masks,
        state,
        guidance_weight: float,
        noise: Tensor | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """Actions sampled with v = v_null + w (v_cond - v_null); w = 1 is plain conditional."""
        batch_size = state.shape[0]
        if noise is None:
            noise = self.sample_noise((batch_size, self.config.chunk_size, self.config.max_action_dim), state.device)
        flags = torch.tensor([OPTIMAL_FLAG] * batch_size + [NULL_FLAG] * batch_size, device=state.device)
        doubled = [torch.cat([x, x]) for x in (lang_tokens, lang_masks, state)]
        with self.conditioning(flags, guidance_weight):
            return self.sample_actions(
                [torch.cat([img, img]) for img in images],
                [torch.cat([mask, mask]) for mask in img_masks],
                *doubled,
                noise=noise,
                num_steps=num_steps,
            )


@PreTrainedConfig.register_subclass("pi0_cfg")
@dataclass
class PI0CFGConfig(SizedPI0Config):
    """`PI0Config` plus the model size ("full"/"tiny") and the guidance weight used at sampling."""

    guidance_weight: float = 1.0


class PI0CFGPolicy(CheckedLoadPolicy):
    """`PI0Policy` around `PI0WithCondition`: acts with guidance, trains with the RL objectives.
    Starts from a plain pi0 checkpoint with a zero flag embedding (it then acts as that pi0)."""

    config_class = PI0CFGConfig
    name = "pi0_cfg"
    loads_types = ("pi0_cfg", "pi0")
    new_parts = ("model.condition_embedding.",)

    def __init__(self, config: PI0CFGConfig, **kwargs: Any) -> None:
        with building_network(PI0WithCondition, config.model_size):
            super().__init__(config, **kwargs)

    def _model_inputs(self, batch: dict[str, Tensor]) -> tuple:
        images, img_masks = self._preprocess_images(batch)
        return (
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            self.prepare_state(batch),
        )

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        self.eval()
        actions = self.model.sample_actions_guided(*self._model_inputs(batch), self.config.guidance_weight, noise=noise)
        return actions[:, :, : self.config.output_features[ACTION].shape[0]]

    def flow_losses(self, batch: dict[str, Tensor], flags: Tensor, noise: Tensor, time: Tensor) -> Tensor:
        """Per-sample flow-matching loss (B,) under optimality `flags` (B,), over real action dims
        and unpadded steps."""
        with self.model.conditioning(flags):
            losses = self.model(*self._model_inputs(batch), self.prepare_action(batch), noise, time)
        per_step = losses[:, :, : self.config.output_features[ACTION].shape[0]].mean(dim=-1)
        valid = (~batch["action_is_pad"]).to(per_step.dtype) if "action_is_pad" in batch else torch.ones_like(per_step)
        return (per_step * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        batch: dict[str, Tensor],
        advantages: Tensor,
        noise: Tensor,
        time: Tensor,
        objective: str = "cfg_rl",
        alpha: float = 0.1,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """RL loss of a batch of rollout windows with their advantages (B,)."""
        if objective == "cfg_rl":
            return cfg_rl_loss(self, batch, advantages, noise, time, alpha)
        if objective == "advantage_filtered":
            return advantage_filtered_loss(self, batch, advantages, noise, time)
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _double(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in batch.items()}


def cfg_rl_loss(
    policy: PI0CFGPolicy, batch: dict[str, Tensor], advantages: Tensor, noise: Tensor, time: Tensor, alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = mean_b( 1[A_b > 0] L_fm(o=1) + alpha L_fm(o=null) ); both branches share noise and
    time and run as one forward over the doubled batch."""
    batch_size = advantages.shape[0]
    flags = torch.tensor([OPTIMAL_FLAG] * batch_size + [NULL_FLAG] * batch_size, device=advantages.device)
    losses = policy.flow_losses(_double(batch), flags, torch.cat([noise, noise]), torch.cat([time, time]))
    cond_losses, null_losses = losses.chunk(2)
    positive = (advantages > 0).to(cond_losses.dtype)
    loss = (positive * cond_losses + alpha * null_losses).mean()
    return loss, {
        "loss": loss.detach(),
        "cond_loss": cond_losses.detach().mean(),
        "null_loss": null_losses.detach().mean(),
        "positive_fraction": positive.mean(),
    }


def advantage_filtered_loss(
    policy: PI0CFGPolicy, batch: dict[str, Tensor], advantages: Tensor, noise: Tensor, time: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain flow matching on the windows with positive advantage (no flag)."""
    flags = torch.full_like(advantages, NULL_FLAG, dtype=torch.long)
    losses = policy.flow_losses(batch, flags, noise, time)
    positive = (advantages > 0).to(losses.dtype)
    loss = (positive * losses).sum() / positive.sum().clamp_min(1.0)
    return loss, {"loss": loss.detach(), "positive_fraction": positive.mean()}


# --- Rollout groups -> training windows (shared by train_ript_pi0.py and the stage scripts) -----


def init_state_key(state: dict[str, Any]) -> tuple[int, int]:
    """History key of an init state: (task id, init-state index)."""
    return int(state["task_id"]), int(state["init_index"])


def rollout_groups(
    envs: Any, policy_fn: Callable, states: list[dict[str, Any]], k: int, sink: list, record_first: bool = False
) -> Tensor:
    """K episodes from each init state in `envs` (a `VectorLiberoRollout`); each state keeps its
    episodes as `state["episodes"]`, every result is appended to `sink`; (len(states), K) rewards.
    `record_first` keeps the frames of the first episode (for a video)."""
    requests = [
        dict(state, record=record_first and i == 0) for i, state in enumerate(s for s in states for _ in range(k))
    ]
    results = envs.run(requests, policy_fn)
    sink.extend(results)
    for index, state in enumerate(states):
        state["episodes"] = results[index * k : (index + 1) * k]
    return torch.tensor([r.success for r in results], dtype=torch.float32).view(len(states), k)


def save_rollout_video(results: list[Any], directory: Path, iteration: int, fps: int = 20) -> Path | None:
    """The first recorded episode of `results` as `directory/iteration_<N>_<success|failure>.mp4`."""
    from lerobot.utils.io_utils import write_video

    recorded = next((r for r in results if r.frames), None)
    if recorded is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"iteration_{iteration:05d}_{'success' if recorded.success else 'failure'}.mp4"
    write_video(path, recorded.frames, fps)
    return path


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
    chunk each produced (steps past the executed ones marked `action_is_pad`); and their advantages."""
    batch = observations_to_batch([windows[i].observation for i in picked])
    batch[ACTION] = torch.from_numpy(np.stack([windows[i].actions for i in picked]))
    executed = torch.tensor([windows[i].executed for i in picked])
    batch["action_is_pad"] = torch.arange(chunk_size)[None] >= executed[:, None]
    return batch, torch.tensor([advantages[i] for i in picked])


def make_ript_policy(model: Any, device: str) -> tuple[PI0CFGPolicy, Any, Any, Any]:
    """The flag-conditioned pi0 for LIBERO (two cameras, 8-dim state, 7-dim actions) from the
    `model` section of a RIPT config, with its pre/post-processors and tokenizer.

    A pretrained source (local path or hub id, resolved through the Hugging Face cache) brings its
    own processors, with the normalization statistics it was trained with; one without them is
    refused. A fresh size ("tiny"/"full") gets identity normalization (there is no dataset to take
    statistics from). A plain pi0 checkpoint starts with a zero flag embedding."""
    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, model.image_size, model.image_size))
    fresh = model.pretrained in MODEL_SIZES
    source = None if fresh else resolve_pretrained(model.pretrained)
    config = PI0CFGConfig(
        model_size=model.pretrained if fresh else saved_model_size(source),
        dtype=model.dtype,
        chunk_size=model.chunk_size,
        n_action_steps=model.chunk_size,
        num_inference_steps=model.num_inference_steps,
        image_resolution=(model.image_size, model.image_size),
        guidance_weight=model.guidance_weight,
        device=device,
        input_features={
            AGENTVIEW_KEY: image,
            WRIST_KEY: image,
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    tokenizer = load_tokenizer(model.tokenizer)
    if fresh:
        config.normalization_mapping = {key: NormalizationMode.IDENTITY for key in ("VISUAL", "STATE", "ACTION")}
        policy = make_pi0_policy(model.pretrained, config, PI0CFGPolicy)
        preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer)
    else:
        preprocessor, postprocessor = load_pi0_processors(source, tokenizer, device)
        policy = make_pi0_policy(source, config, PI0CFGPolicy)
    return policy, preprocessor, postprocessor, tokenizer
