"""The policy a server runs: any checkpoint kind this project writes, loaded and checked, with its
processors; and what a client is told of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from lib.policies.flag_pi0 import PI0CFGPolicy, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.loading import CheckpointError, load_pretrained_policy, resolve_pretrained, saved_config
from lib.policies.processors import load_pi0_processors, load_tokenizer

# graph pi0 (train_soft_arm.py), flag pi0 (the RL trainers), plain pi0 (export_pi0.py)
SERVED_TYPES = {cls.name: cls for cls in (PI0GraphPolicy, PI0GraphCFGPolicy, PI0CFGPolicy, PI0Policy)}


def load_served_policy(source: str | Path, device: str, model_size: str | None = None) -> tuple[Any, Any, Any]:
    """The checkpoint's policy (checked loading) and its processors; `model_size` for a plain pi0
    whose config names no size (`load_pretrained_policy`)."""
    checkpoint = resolve_pretrained(source)
    saved_type = saved_config(checkpoint).get("type")
    if saved_type not in SERVED_TYPES:
        raise CheckpointError(f"{checkpoint} holds a {saved_type!r} policy; this serves {', '.join(SERVED_TYPES)}")
    config = PreTrainedConfig.from_pretrained(checkpoint)
    config.device = device
    policy = load_pretrained_policy(checkpoint, SERVED_TYPES[saved_type], config, model_size=model_size).eval()
    preprocessor, postprocessor = load_pi0_processors(checkpoint, load_tokenizer(checkpoint), device)
    return policy, preprocessor, postprocessor


def metadata_of(policy: Any) -> dict[str, Any]:
    """The policy's type, guidance weight and action chunk shape (the openpi metadata frame)."""
    config = policy.config
    action_dim = config.output_features["action"].shape[0]
    return {
        "policy_type": config.type,
        "guidance_weight": getattr(config, "guidance_weight", None),
        "action_shape": [config.chunk_size, action_dim],
    }
