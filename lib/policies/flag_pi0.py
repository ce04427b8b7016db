"""The flag-conditioned pi0 of CFG-RL (CFGRL, Frans et al. 2025).

`PI0CFGPolicy`: pi0 conditioned on an optimality flag (a learned embedding added to the state
token), sampled with guidance weight w: v = v_null + w (v_cond - v_null); its `forward` is the RL
loss of `lib.rl.objectives`. `PI0GraphCFGPolicy`: the same on the graph pi0 of the soft arm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn
from transformers import DynamicCache

from lib.policies.graph_pi0 import PI0GraphConfig, PI0WithGraph, batch_graph
from lib.policies.loading import CheckedLoadPolicy
from lib.policies.sizes import SizedPI0Config
from lib.run.schemas import OBJECTIVES

NULL_FLAG, OPTIMAL_FLAG = 0, 1


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the `mask`ed elements of each row: (B, ...) -> (B,)."""
    mask = mask.to(values.dtype)
    return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


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
        self._flow_noise: tuple[float, float, list[tuple[Tensor, Tensor]]] | None = None
        self._doubled_cache: tuple[DynamicCache, DynamicCache] | None = None

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

    @contextlib.contextmanager
    def noisy_sampling(self, std: float, num_steps: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Flow-Noise sampling: within the block every Euler step of `sample_actions` becomes a
        Gaussian transition x_{k+1} = x_k + dt v(x_k, t_k) + std eps. LeRobot's loop computes
        x + dt v', so the noise enters as v' = v + std eps / dt. Yields the record: per step, x_k and
        the transition mean x_k + dt v."""
        record: list[tuple[Tensor, Tensor]] = []
        self._flow_noise = (std, -1.0 / num_steps, record)
        try:
            yield record
        finally:
            self._flow_noise = None

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        if self._guidance_weight is None:
            velocity = super().denoise_step(state, prefix_pad_masks, past_key_values, x_t, timestep)
        else:
            # Both branches in one forward of the suffix, [cond; null]. The flag lives in the suffix,
            # so the prefix (images and language, the expensive part) and its KV cache were built
            # once on the batch; here they are repeated for the two halves.
            both = super().denoise_step(
                torch.cat([state, state]),
                torch.cat([prefix_pad_masks, prefix_pad_masks]),
                self._doubled_prefix_cache(past_key_values),
                torch.cat([x_t, x_t]),
                torch.cat([timestep, timestep]),
            )
            v_cond, v_null = both.chunk(2)
            velocity = v_null + self._guidance_weight * (v_cond - v_null)
        if self._flow_noise is None:
            return velocity
        std, dt, record = self._flow_noise
        record.append((x_t, x_t + dt * velocity))
        return velocity + std * torch.randn_like(x_t) / dt

    def _doubled_prefix_cache(self, past_key_values: DynamicCache) -> DynamicCache:
        """The prefix KV cache repeated along the batch, [cache; cache], built once per sampling
        call (LeRobot's `denoise_step` clones the cache it is given, so the copy is never mutated)."""
        if self._doubled_cache is None or self._doubled_cache[0] is not past_key_values:
            doubled = DynamicCache(
                tuple((torch.cat([k, k]), torch.cat([v, v]), window) for k, v, window in past_key_values)
            )
            self._doubled_cache = (past_key_values, doubled)
        return self._doubled_cache[1]

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
        **model_kwargs: Tensor | None,
    ) -> Tensor:
        """Actions sampled with v = v_null + w (v_cond - v_null); w = 1 is the conditional branch
        alone (one suffix pass). The prefix is computed once; `model_kwargs` (suffix inputs, e.g. a
        subclass's `graph`) are doubled like the suffix."""
        batch_size = state.shape[0]
        if noise is None:
            noise = self.sample_noise((batch_size, self.config.chunk_size, self.config.max_action_dim), state.device)
        if guidance_weight == 1.0:  # v_null + 1 (v_cond - v_null) is v_cond: the optimal branch alone
            with self.conditioning(torch.full((batch_size,), OPTIMAL_FLAG, device=state.device)):
                return self.sample_actions(
                    images, img_masks, lang_tokens, lang_masks, state, noise=noise, num_steps=num_steps, **model_kwargs
                )
        flags = torch.tensor([OPTIMAL_FLAG] * batch_size + [NULL_FLAG] * batch_size, device=state.device)
        doubled_kwargs = {k: None if v is None else torch.cat([v, v]) for k, v in model_kwargs.items()}
        try:
            with self.conditioning(flags, guidance_weight):
                return self.sample_actions(
                    images,
                    img_masks,
                    lang_tokens,
                    lang_masks,
                    state,
                    noise=noise,
                    num_steps=num_steps,
                    **doubled_kwargs,
                )
        finally:
            self._doubled_cache = None


@PreTrainedConfig.register_subclass("pi0_cfg")
@dataclass
class PI0CFGConfig(SizedPI0Config):
    """`PI0Config` plus the model size ("full", "small" or "tiny") and the guidance weight used at sampling."""

    guidance_weight: float = 1.0


class PI0CFGPolicy(CheckedLoadPolicy):
    """`PI0Policy` around `PI0WithCondition`: acts with guidance, trains with the RL objectives.
    Starts from a plain pi0 checkpoint with a zero flag embedding (it then acts as that pi0)."""

    config_class = PI0CFGConfig
    name = "pi0_cfg"
    new_parts = {"pi0": ("model.condition_embedding.",)}
    network_cls = PI0WithCondition

    def __init__(self, config: PI0CFGConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # Exploration noise of Flow-Noise sampling (0: the deterministic guided sampler). A run-time
        # setting of the RL loop (`exploration_noise`), not saved: a checkpoint acts deterministically.
        self.flow_noise_std = 0.0
        # SDE noise of the guided sampler while exploring (`rollout_noise`); also not saved.
        self.rollout_noise_std = 0.0
        self._sampling_record: dict[str, Tensor] | None = None

    def _model_kwargs(self, batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
        """Network inputs beyond plain pi0's (none here; the graph in the graph variant)."""
        return {}

    def _model_inputs(self, batch: dict[str, Tensor]) -> tuple:
        images, img_masks = self._preprocess_images(batch)
        return (
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            self.prepare_state(batch),
        )

    @property
    def action_dim(self) -> int:
        return self.config.output_features[ACTION].shape[0]

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Guided sampling (with SDE noise while `rollout_noise_std` > 0); with `flow_noise_std` > 0,
        Flow-Noise sampling whose denoising chain and step log-probabilities wait in
        `pop_sampling_record()` for the rollout to keep."""
        self.eval()
        if self.flow_noise_std > 0:
            actions, chain, step_log_probs = self.sample_with_flow_noise(batch, noise)
            self._sampling_record = {"flow_chain": chain, "flow_step_log_probs": step_log_probs}
            return actions
        exploring = (
            self.model.noisy_sampling(self.rollout_noise_std, self.config.num_inference_steps)
            if self.rollout_noise_std > 0
            else contextlib.nullcontext()
        )
        with exploring:
            actions = self.model.sample_actions_guided(
                *self._model_inputs(batch), self.config.guidance_weight, noise=noise, **self._model_kwargs(batch)
            )
        return actions[:, :, : self.action_dim]

    def pop_sampling_record(self) -> dict[str, Tensor] | None:
        """What the last `predict_action_chunk` recorded for the update (per batch row), once."""
        record, self._sampling_record = self._sampling_record, None
        return record

    @torch.no_grad()
    def sample_with_flow_noise(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> tuple[Tensor, ...]:
        """Flow-Noise sampling (unguided, null flag): actions (B, chunk, action_dim), the denoising
        chain x_0 (noise) ... x_K (actions) as (B, K+1, chunk, max_action_dim), and the exact
        log-probability of every step's transition, per element (B, K, chunk, max_action_dim)."""
        inputs = self._model_inputs(batch)
        flags = torch.full((inputs[-1].shape[0],), NULL_FLAG, device=inputs[-1].device)
        steps = self.config.num_inference_steps
        with self.model.conditioning(flags), self.model.noisy_sampling(self.flow_noise_std, steps) as record:
            final = self.model.sample_actions(*inputs, noise=noise, num_steps=steps, **self._model_kwargs(batch))
        chain = torch.stack([x for x, _ in record] + [final], dim=1).float()
        means = torch.stack([mean for _, mean in record], dim=1).float()
        step_log_probs = torch.distributions.Normal(means, self.flow_noise_std).log_prob(chain[:, 1:])
        return final[:, :, : self.action_dim], chain, step_log_probs

    def chain_log_probs(self, batch: dict[str, Tensor], chain: Tensor, std: float) -> Tensor:
        """Log-probability (with gradient) of every transition of recorded denoising chains
        (B, K+1, chunk, max_action_dim) under Flow-Noise sampling with `std`, per element.

        Through LeRobot's own training forward, which returns (u - v(x_t, t))^2 for
        x_t = t noise + (1 - t) actions and u = noise - actions: choosing noise and actions so that
        x_t = x_k and u = (x_{k+1} - x_k) / dt makes it (x_{k+1} - x_k - dt v(x_k, t_k))^2 / dt^2,
        the Gaussian's exponent up to the factor dt^2 / (2 std^2). All K steps of all windows run as
        one batch of B*K rows (null flag, as sampled)."""
        batch_size, steps = chain.shape[0], chain.shape[1] - 1
        dt = -1.0 / steps
        x_k, x_next = chain[:, :-1], chain[:, 1:]
        times = (1.0 + dt * torch.arange(steps, device=chain.device, dtype=torch.float32))[None, :, None, None]
        velocity_target = (x_next - x_k) / dt
        actions, noise = x_k - times * velocity_target, x_k + (1 - times) * velocity_target

        def repeat(value: Any) -> Any:
            if isinstance(value, list):
                return [repeat(item) for item in value]
            return None if value is None else value.repeat_interleave(steps, dim=0)

        inputs = [repeat(value) for value in self._model_inputs(batch)]
        model_kwargs = {key: repeat(value) for key, value in self._model_kwargs(batch).items()}
        flags = torch.full((batch_size * steps,), NULL_FLAG, device=chain.device)
        with self.model.conditioning(flags):
            squared = self.model(
                *inputs,
                actions.flatten(0, 1),
                noise.flatten(0, 1),
                times.expand(batch_size, steps, 1, 1).flatten(),
                **model_kwargs,
            )
        log_probs = -(dt**2) * squared / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        return log_probs.view(chain.shape[0], steps, *chain.shape[2:])

    def flow_losses(self, batch: dict[str, Tensor], flags: Tensor, noise: Tensor, time: Tensor) -> Tensor:
        """Per-sample flow-matching loss (B,) under optimality `flags` (B,), over real action dims
        and unpadded steps."""
        with self.model.conditioning(flags):
            losses = self.model(
                *self._model_inputs(batch), self.prepare_action(batch), noise, time, **self._model_kwargs(batch)
            )
        per_step = losses[:, :, : self.action_dim].mean(dim=-1)
        valid = ~batch["action_is_pad"] if "action_is_pad" in batch else torch.ones_like(per_step, dtype=torch.bool)
        return masked_mean(per_step, valid)

    def forward(
        self,
        batch: dict[str, Tensor],
        advantages: Tensor,
        noise: Tensor,
        time: Tensor,
        objective: str = "cfg_rl",
        alpha: float = 0.1,
        std: float = 0.1,
        clip_epsilon: float = 0.2,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """RL loss of a batch of rollout windows with their advantages (B,). `alpha`: the null
        branch's weight in cfg_rl; `std`, `clip_epsilon`: flow_noise's sampling noise and PPO clip."""
        # imported here: lib.rl.objectives imports this module (the objectives call the policy's parts)
        from lib.rl.objectives import advantage_filtered_loss, cfg_rl_loss, flow_noise_loss

        if objective == "cfg_rl":
            return cfg_rl_loss(self, batch, advantages, noise, time, alpha)
        if objective == "advantage_filtered":
            return advantage_filtered_loss(self, batch, advantages, noise, time)
        if objective == "behavior_cloning":
            return advantage_filtered_loss(self, batch, torch.ones_like(advantages), noise, time)
        if objective == "flow_noise":
            return flow_noise_loss(self, batch, advantages, std, clip_epsilon)
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


class PI0WithGraphAndCondition(PI0WithCondition, PI0WithGraph):
    """Both extensions of `embed_suffix`, composed by inheritance: the flag's `embed_suffix` adds
    its embedding to the first suffix token of the graph's `embed_suffix` (still the state token:
    the graph tokens go after it); `forward`/`sample_actions` take the graph, `denoise_step` guides."""


@PreTrainedConfig.register_subclass("pi0_graph_cfg")
@dataclass
class PI0GraphCFGConfig(PI0CFGConfig, PI0GraphConfig):
    """`PI0GraphConfig` plus the guidance weight (`from_config` turns a graph checkpoint's config
    into this one)."""


class PI0GraphCFGPolicy(PI0CFGPolicy):
    """The graph pi0 with the optimality flag: RL objectives and guided sampling on the soft arm.
    Starts from a graph (behaviour-cloning) checkpoint with a zero flag embedding, so it first acts
    exactly as that checkpoint."""

    config_class = PI0GraphCFGConfig
    name = "pi0_graph_cfg"
    new_parts = {"pi0_graph": ("model.condition_embedding.",)}
    network_cls = PI0WithGraphAndCondition

    def _model_kwargs(self, batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
        return {"graph": batch_graph(batch, self.config.use_graph)}
