"""Demonstrations as an anchor of the RL update (`rl.demo_dataset`): every update minibatch also
holds `rl.demos_per_minibatch` frames of the behaviour-cloning demonstrations, as forced positives
(advantage +1: cfg_rl's optimal flag, advantage_filtered's filter), so the update keeps fitting what
the start was cloned from while it learns from rollouts (RECAP keeps its demonstrations in the
conditional set the same way). Only demonstrations of training tasks may be given: a held-out
evaluation task must never contribute data."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from lib.run.errors import UserError
from lib.run.keys import stable_key

DEMO_ADVANTAGE = 1.0  # a demonstration frame is a positive whatever the rollouts' advantages


def check_demonstrations(demos: Any, features: dict[str, Any], action_shape: tuple[int, int], source: str) -> None:
    """Refuse a demonstration dataset that lacks a policy input or the action chunk, or whose
    non-image shapes differ from the policy's (`features`: name -> LeRobot feature with `.shape`;
    `action_shape`: (chunk, action dim)); `source` names it."""
    if len(demos) == 0:
        raise UserError(f"rl.demo_dataset {source}: no frames")
    item = demos[0]
    for name, feature in features.items():
        if name not in item:
            raise UserError(f"rl.demo_dataset {source}: no '{name}', which the policy takes ({sorted(features)})")
        # images: the rollouts' size, not the policy's (pi0 resizes both); the driver loads them so
        if not name.startswith("observation.images.") and tuple(item[name].shape) != tuple(feature.shape):
            raise UserError(
                f"rl.demo_dataset {source}: '{name}' has shape {tuple(item[name].shape)}, the policy expects "
                f"{tuple(feature.shape)}"
            )
    for name in ("action", "action_is_pad", "task"):
        if name not in item:
            raise UserError(f"rl.demo_dataset {source}: no '{name}' (expected action chunks, their padding, the task)")
    if tuple(item["action"].shape) != tuple(action_shape):
        raise UserError(
            f"rl.demo_dataset {source}: action chunks of shape {tuple(item['action'].shape)}, the policy's are "
            f"{tuple(action_shape)}"
        )


def demo_minibatch(demos: Any, count: int, *key: object) -> dict[str, Any]:
    """`count` frames of `demos` drawn with `stable_key("demos", *key)`, collated like a loader's
    batch (a resumed run draws what the uninterrupted one drew)."""
    generator = torch.Generator().manual_seed(stable_key("demos", *key))
    picked = torch.randint(len(demos), (count,), generator=generator).tolist()
    return default_collate([demos[i] for i in picked])


def join_batches(batch: dict[str, Any], demos: dict[str, Any]) -> dict[str, Any]:
    """The raw window batch with the demonstration frames appended, row-wise, key by key of `batch`."""
    joined = {}
    for key, value in batch.items():
        extra = demos[key]
        joined[key] = value + list(extra) if isinstance(value, list) else torch.cat([value, extra.to(value.dtype)])
    return joined


def demo_noise_keys(count: int, *key: object) -> list[int]:
    """The flow-matching noise keys of one minibatch's demonstration frames (`keyed_noise_and_time`)."""
    return [stable_key("demo noise", *key, row) for row in range(count)]
