"""Flow-matching noise and time drawn from keys, so a resumed or re-run step draws the same."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lerobot.policies.pi0 import modeling_pi0


def seeded_noise_and_time(
    model: modeling_pi0.PI0Pytorch, batch_size: int, seed: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise (B, chunk, max_action_dim) and time (B,) drawn with LeRobot's own
    samplers from a private RNG seeded by `seed`: a resumed run draws what the uninterrupted run
    drew, and two branches can share them. Drawn on the CPU so the result is device-independent."""
    config = model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = model.sample_noise((batch_size, config.chunk_size, config.max_action_dim), "cpu")
        time = model.sample_time(batch_size, "cpu")
    return noise.to(device), time.to(device)


def keyed_noise_and_time(
    model: modeling_pi0.PI0Pytorch, keys: Sequence[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise (B, chunk, max_action_dim) and time (B,), each sample's drawn with
    LeRobot's own samplers from a private RNG seeded by its own key (say, from the frame index and
    the epoch). A sample then gets the same noise whatever batch, micro-batch or rank it lands in:
    two accumulated micro-batches compute the loss of one step at their union, to rounding."""
    config = model.config
    noises, times = [], []
    with torch.random.fork_rng(devices=[]):
        for key in keys:
            torch.manual_seed(key)
            noises.append(model.sample_noise((1, config.chunk_size, config.max_action_dim), "cpu"))
            times.append(model.sample_time(1, "cpu"))
    return torch.cat(noises).to(device), torch.cat(times).to(device)
