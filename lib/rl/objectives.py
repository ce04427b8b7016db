"""The RL objectives of the flag pi0, per window of a rollout with its advantage.

`cfg_rl`: L = 1[A > 0] L_fm(o=1) + alpha L_fm(o=null) (the two branches share noise and time, in one
batched forward); `advantage_filtered` (flow matching on the windows with A > 0) is the plain
baseline, `behavior_cloning` (every window, reward ignored) the no-reward control, `flow_noise` a
PPO-style objective on the log-probabilities of a noisy sampling chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lerobot.utils.constants import OBS_LANGUAGE_TOKENS
from torch import Tensor

from lib.policies.flag_pi0 import NULL_FLAG, OPTIMAL_FLAG, PI0CFGPolicy, masked_mean


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


def window_mask(policy: PI0CFGPolicy, batch: dict[str, Tensor], shape: torch.Size) -> Tensor:
    """(B, K, chunk, max_action_dim) mask of the elements of a denoising chain that became executed
    actions: the real action dims of the unpadded chunk steps."""
    mask = torch.zeros(shape, dtype=torch.bool, device=batch[OBS_LANGUAGE_TOKENS].device)
    mask[..., : policy.action_dim] = True
    if "action_is_pad" in batch:
        mask &= ~batch["action_is_pad"][:, None, :, None]
    return mask


def flow_noise_loss(
    policy: PI0CFGPolicy, batch: dict[str, Tensor], advantages: Tensor, std: float, clip_epsilon: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate on the Flow-Noise log-probabilities of the executed actions' chains.

    The ratio is exp of the mean per-element log-ratio (new minus old, the old recorded at rollout
    time) over the executed elements of a window's chain, like GRPO's per-token ratios: a sum over
    its thousands of Gaussian elements would make one ratio explode. With zero advantages the loss
    and its gradient are zero."""
    chain = batch["flow_chain"]
    mask = window_mask(policy, batch, chain[:, 1:].shape)
    new = masked_mean(policy.chain_log_probs(batch, chain, std), mask)
    old = masked_mean(batch["flow_step_log_probs"], mask)
    ratio = torch.exp(new - old)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages)
    loss = -surrogate.mean()
    return loss, {
        "loss": loss.detach(),
        "approx_kl": (old - new).detach().mean(),
        "clip_fraction": ((ratio - 1).abs() > clip_epsilon).float().mean(),
    }


@contextlib.contextmanager
def exploration_noise(policy: Any, rl: Any) -> Iterator[None]:
    """Within the block `policy` samples as the RL objective needs: Flow-Noise sampling with
    `rl.flow_noise_std` for `flow_noise`, deterministic otherwise."""
    policy.flow_noise_std = rl.flow_noise_std if rl.objective == "flow_noise" else 0.0
    try:
        yield
    finally:
        policy.flow_noise_std = 0.0


@contextlib.contextmanager
def rollout_noise(policy: Any, std: float) -> Iterator[None]:
    """Within the block `policy` samples as it acts (guided), with SDE noise of `std` added at every
    denoising step (Flow-Noise's transition, nothing recorded): exploration at rollout time only."""
    policy.rollout_noise_std = std
    try:
        yield
    finally:
        policy.rollout_noise_std = 0.0
