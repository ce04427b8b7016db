"""What every simulator's rollouts share: the policy-call record (`Window`), the conversion of
simulator observations into a policy batch, and the batched policy function the simulators call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_PREFIX = "observation.images."

PolicyFn = Callable[[list[dict[str, Any]]], np.ndarray]


@dataclass
class Window:
    """One policy call of an episode: what it saw and the chunk it produced (first `executed`
    actions were run in the simulator)."""

    observation: dict[str, Any]
    actions: np.ndarray
    executed: int


def observations_to_batch(observations: list[dict[str, Any]]) -> dict[str, Any]:
    """Simulator observations -> a policy batch: `observation.images.*` (HWC uint8) become CHW
    float images in [0, 1], the other `observation.*` arrays are stacked, `task` is kept as a list;
    any other key (bookkeeping of the simulator) is left out."""
    batch: dict[str, Any] = {}
    for key in observations[0]:
        stacked = np.stack([o[key] for o in observations]) if key.startswith("observation.") else None
        if key.startswith(IMAGE_PREFIX):
            batch[key] = torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255.0
        elif stacked is not None:
            batch[key] = torch.from_numpy(stacked)
    batch["task"] = [o["task"] for o in observations]
    return batch


def make_policy_fn(
    policy: Any,
    preprocessor: Callable,
    postprocessor: Callable,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PolicyFn:
    """The simulators' view of a policy: observations in, unnormalized action chunks
    (n, chunk, action_dim) out, one batched `predict_action_chunk` for all of them."""

    @torch.no_grad()
    def policy_fn(observations: list[dict[str, Any]]) -> np.ndarray:
        with autocast():
            chunks = policy.predict_action_chunk(preprocessor(observations_to_batch(observations)))
        return postprocessor(chunks.float()).numpy()

    return policy_fn


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
