"""The optimizer and learning-rate schedule both trainers use."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def make_optimizer(policy: torch.nn.Module, optim: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `policy`, from an `optim` config section (lr, betas,
    eps, weight_decay); the fused kernel on a GPU."""
    return torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=torch.cuda.is_available(),
    )


def cosine_with_warmup(warmup_steps: int, total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine decay from 1 to `final_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
