"""What every simulator's rollouts share: the policy-call record (`Window`), the conversion of
simulator observations into a policy batch, and the batched policy function the simulators call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_PREFIX = "observation.images."


@dataclass
class PolicyOutput:
    """Action chunks (n, chunk, action_dim) plus, per row, what the RL update needs of how they
    were sampled (e.g. Flow-Noise's denoising chain and step log-probabilities)."""

    actions: np.ndarray
    extras: list[dict[str, np.ndarray]]


# Observations in; action chunks (n, chunk, action_dim) out, or a `PolicyOutput`.
PolicyFn = Callable[[list[dict[str, Any]]], "np.ndarray | PolicyOutput"]


def split_policy_output(output: np.ndarray | PolicyOutput) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """(float32 chunks, per-row extras) of a policy function's answer."""
    if isinstance(output, PolicyOutput):
        return np.asarray(output.actions, dtype=np.float32), output.extras
    chunks = np.asarray(output, dtype=np.float32)
    return chunks, [{} for _ in range(len(chunks))]


@dataclass
class Window:
    """One policy call of an episode: what it saw and the chunk it produced (first `executed`
    actions were run in the simulator)."""

    observation: dict[str, Any]
    actions: np.ndarray
    executed: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # see PolicyOutput


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
    (n, chunk, action_dim) out, one batched `predict_action_chunk` for all of them; a
    `PolicyOutput` when the policy recorded how it sampled (`pop_sampling_record`)."""

    @torch.no_grad()
    def policy_fn(observations: list[dict[str, Any]]) -> np.ndarray | PolicyOutput:
        with autocast():
            chunks = policy.predict_action_chunk(preprocessor(observations_to_batch(observations)))
        actions = postprocessor(chunks.float()).numpy()
        record = policy.pop_sampling_record() if hasattr(policy, "pop_sampling_record") else None
        if record is None:
            return actions
        rows = {key: value.float().cpu().numpy() for key, value in record.items()}
        return PolicyOutput(actions, [{key: value[i] for key, value in rows.items()} for i in range(len(actions))])

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
