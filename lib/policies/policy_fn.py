"""The policy function the vector rollouts call: observations in, actions (and the sampling
record) out, from a policy and its processors or from a checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from lib.envs.vector_rollout import IMAGE_PREFIX, PolicyFn, PolicyOutput
from lib.policies.loading import CheckpointError, load_pretrained_policy, resolve_pretrained, saved_config
from lib.policies.processors import load_pi0_processors, load_tokenizer


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


def load_policy_fn(checkpoint: str | Path, policy_for_type: dict[str, type[PI0Policy]]) -> PolicyFn:
    """A checkpoint's `pretrained_model` directory as the simulators' batched policy function
    (`make_policy_fn`), on the GPU in bf16 autocast when there is one.

    `policy_for_type` maps each saved policy type the caller evaluates to the class that runs it;
    a type mapped to a class of another type is loaded into it with the class's new parts fresh
    (only where they leave it acting unchanged, like a zero flag embedding). Any other checkpoint
    is a `CheckpointError` naming the directory."""
    checkpoint = resolve_pretrained(checkpoint)
    saved_type = saved_config(checkpoint).get("type")
    if saved_type not in policy_for_type:
        raise CheckpointError(
            f"{checkpoint} holds a {saved_type!r} policy; this evaluates {' or '.join(policy_for_type)} checkpoints"
        )
    policy_cls = policy_for_type[saved_type]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = PreTrainedConfig.from_pretrained(checkpoint)
    config = saved if isinstance(saved, policy_cls.config_class) else policy_cls.config_class.from_config(saved)
    config.device = device
    policy = load_pretrained_policy(checkpoint, policy_cls, config).eval()
    preprocessor, postprocessor = load_pi0_processors(checkpoint, load_tokenizer(checkpoint), device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    return make_policy_fn(policy, preprocessor, postprocessor, autocast)
