"""The flag-conditioned pi0 of CFG-RL (CFGRL, Frans et al. 2025) and its RL objectives.

`PI0CFGPolicy`: pi0 conditioned on an optimality flag (a learned embedding added to the state
token), trained with the CFG-RL objective L = 1[A > 0] L_fm(o=1) + alpha L_fm(o=null) (the two
branches share noise and time, in one batched forward) and sampled with guidance weight w:
v = v_null + w (v_cond - v_null). `advantage_filtered` (flow matching on the windows with A > 0)
is the plain baseline, `behavior_cloning` (every window, reward ignored) the no-reward control.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lib.graph_pi0 import PI0GraphConfig, PI0WithGraph, batch_graph
from lib.pi0 import CheckedLoadPolicy, SizedPI0Config
from lib.schemas import OBJECTIVES

NULL_FLAG, OPTIMAL_FLAG = 0, 1


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
        **model_kwargs: Tensor | None,
    ) -> Tensor:
        """Actions sampled with v = v_null + w (v_cond - v_null); w = 1 is plain conditional.
        `model_kwargs` (e.g. a subclass's `graph`) are doubled with the other inputs."""
        batch_size = state.shape[0]
        if noise is None:
            noise = self.sample_noise((batch_size, self.config.chunk_size, self.config.max_action_dim), state.device)
        flags = torch.tensor([OPTIMAL_FLAG] * batch_size + [NULL_FLAG] * batch_size, device=state.device)
        doubled = [torch.cat([x, x]) for x in (lang_tokens, lang_masks, state)]
        doubled_kwargs = {k: None if v is None else torch.cat([v, v]) for k, v in model_kwargs.items()}
        with self.conditioning(flags, guidance_weight):
            return self.sample_actions(
                [torch.cat([img, img]) for img in images],
                [torch.cat([mask, mask]) for mask in img_masks],
                *doubled,
                noise=noise,
                num_steps=num_steps,
                **doubled_kwargs,
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
    new_parts = {"pi0": ("model.condition_embedding.",)}
    network_cls = PI0WithCondition

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

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        self.eval()
        actions = self.model.sample_actions_guided(
            *self._model_inputs(batch), self.config.guidance_weight, noise=noise, **self._model_kwargs(batch)
        )
        return actions[:, :, : self.config.output_features[ACTION].shape[0]]

    def flow_losses(self, batch: dict[str, Tensor], flags: Tensor, noise: Tensor, time: Tensor) -> Tensor:
        """Per-sample flow-matching loss (B,) under optimality `flags` (B,), over real action dims
        and unpadded steps."""
        with self.model.conditioning(flags):
            losses = self.model(
                *self._model_inputs(batch), self.prepare_action(batch), noise, time, **self._model_kwargs(batch)
            )
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
        if objective == "behavior_cloning":
            return advantage_filtered_loss(self, batch, torch.ones_like(advantages), noise, time)
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


# --- The graph policy with the flag: CFG-RL on the soft arm ---------------------------------------


class PI0WithGraphAndCondition(PI0WithCondition, PI0WithGraph):
    """Both extensions of `embed_suffix`, composed by inheritance: the flag's `embed_suffix` adds
    its embedding to the first suffix token of the graph's `embed_suffix` (still the state token:
    the graph tokens go after it); `forward`/`sample_actions` take the graph, `denoise_step` guides."""


@PreTrainedConfig.register_subclass("pi0_graph_cfg")
@dataclass
class PI0GraphCFGConfig(PI0CFGConfig, PI0GraphConfig):
    """`PI0GraphConfig` plus the guidance weight."""

    @classmethod
    def from_graph_config(cls, config: PI0GraphConfig, guidance_weight: float) -> PI0GraphCFGConfig:
        """The config of a graph checkpoint with the flag added (every saved setting kept)."""
        values = {f.name: getattr(config, f.name) for f in fields(PI0GraphConfig) if f.init}
        return cls(**values, guidance_weight=guidance_weight)


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
