"""One LIBERO simulator in its own process: the worker side of `lib.envs.libero.rollout.VectorLiberoRollout`,
with the suite, env and observation helpers it needs.

The worker is started as `python -m lib.envs.libero.worker FD BENCHMARK CAMERA_SIZE SEED SETTLE_STEPS GPU` with
one end of a socket pair as FD, not through `multiprocessing`'s spawn: spawn runs the parent's
main script again in every child, and a training script's imports (LeRobot, transformers, torch)
cost more than the simulator itself. This module imports neither torch nor the policy code.
"""

from __future__ import annotations

import os
import sys
import zlib
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from lib.envs.vector_rollout import serve_simulator
from lib.run.config import ConfigError
from lib.run.keys import stable_key

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

# Episode step limits per suite (the standard LIBERO evaluation protocol).
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
STATE_DIM, ACTION_DIM = 8, 7
SETTLE_STEPS = 10  # no-op steps after a reset while objects fall into place (the LIBERO protocol)
NOOP_ACTION = np.array([0.0] * 6 + [-1.0], dtype=np.float32)
# LeRobot's names for LIBERO's cameras (its LiberoEnv features_map, and the LIBERO datasets and
# checkpoints made with it), so a checkpoint trained here runs in lerobot-eval and back.
AGENTVIEW_KEY = "observation.images.image"
WRIST_KEY = "observation.images.image2"
STATE_KEY = "observation.state"


def get_suite(benchmark_name: str) -> Any:
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    if benchmark_name not in suites:
        raise ConfigError(f"unknown LIBERO benchmark {benchmark_name!r}; expected one of {sorted(MAX_STEPS)}")
    return suites[benchmark_name]()


def max_steps_of(benchmark_name: str) -> int:
    if benchmark_name not in MAX_STEPS:
        raise ConfigError(f"no standard step limit for {benchmark_name!r}; known: {sorted(MAX_STEPS)}")
    return MAX_STEPS[benchmark_name]


def make_libero_env(
    benchmark_name: str, task_id: int, camera_size: int = 128, seed: int = 0, render_gpu_device_id: int = -1
) -> Any:
    """An off-screen LIBERO env for one task of a suite, rendering on GPU `render_gpu_device_id`
    (-1: the default EGL device)."""
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    task = get_suite(benchmark_name).get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(
        bddl_file_name=bddl,
        camera_heights=camera_size,
        camera_widths=camera_size,
        render_gpu_device_id=render_gpu_device_id,
    )
    env.seed(seed % 2**32)  # robosuite seeds NumPy's legacy RNG, which takes 32 bits
    return env


def observation_to_policy(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LIBERO observation -> policy features: both cameras upright (LIBERO renders them upside
    down), state = end-effector position (3), axis-angle (3), gripper joints (2)."""
    from robosuite.utils.transform_utils import quat2axisangle

    state = np.concatenate([obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]])
    return {
        AGENTVIEW_KEY: np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]),
        WRIST_KEY: np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1]),
        STATE_KEY: state.astype(np.float32),
    }


def scene_seed(seed: int, init_state: np.ndarray) -> int:
    """The env seed of an episode: a function of the simulators' seed and the init state."""
    return stable_key("scene", seed, zlib.crc32(np.ascontiguousarray(init_state).tobytes())) % 2**32


def serve(
    connection: Any, benchmark_name: str, camera_size: int, seed: int, settle_steps: int, render_gpu_device_id: int
) -> None:
    """Worker loop (`lib.envs.vector_rollout.serve_simulator`): ("reset", task_id, init_state) -> observation;
    ("step", actions, record) -> (observation, success, steps executed, frames); ("close",) ends it."""
    env, env_task = None, None

    def handle(command: str, payload: tuple) -> Any:
        nonlocal env, env_task
        if command == "reset":
            task_id, init_state = payload
            if env_task != task_id:  # hard reset: the scene of another task
                if env is not None:
                    env.close()
                env, env_task = (
                    make_libero_env(benchmark_name, task_id, camera_size, seed, render_gpu_device_id),
                    task_id,
                )
            # Fixtures (cabinets, stoves) are placed by the env's RNG at reset and are not part of
            # the init state: reseed from the init state, so an episode depends on its request
            # alone, not on the episodes this simulator ran before (a resumed run repeats it), and
            # the K rollouts of one state share one scene.
            env.seed(scene_seed(seed, init_state))
            env.reset()
            obs = env.set_init_state(init_state)
            for _ in range(settle_steps):
                obs, _, _, _ = env.step(NOOP_ACTION)
            return observation_to_policy(obs)
        if command == "step":
            actions, record = payload
            frames, success, executed = [], False, 0
            for action in actions:
                obs, _, done, _ = env.step(action)
                executed += 1
                if record:
                    frames.append(np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]))
                success = bool(env.check_success())
                if success or done:
                    break
            return observation_to_policy(obs), success, executed, frames
        raise ValueError(f"unknown command {command!r}")

    try:
        serve_simulator(connection, handle)
    finally:
        if env is not None:
            env.close()


def main(argv: list[str]) -> None:
    fd, benchmark_name, camera_size, seed, settle_steps, render_gpu_device_id = argv
    serve(
        Connection(int(fd)), benchmark_name, int(camera_size), int(seed), int(settle_steps), int(render_gpu_device_id)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
