"""The simulated soft arm (`lib.envs.soft_arm.sim`) as a Gymnasium environment, the way LeRobot's
evaluation (`lerobot-eval --env.type=soft_arm`, plugin `plugins/lerobot_env_soft_arm`) and any
Gymnasium tool drive a simulator.

Observations use LeRobot's env conventions, which `lerobot.envs.utils.preprocess_observation`
turns into the policy's features: `pixels/front` -> `observation.images.front` (HxWx3 uint8),
`agent_pos` -> `observation.state` (the 10 cable commands), `graph` -> `observation.graph` (10
nodes x 19 features); the instruction is the `task_description` attribute (and `info["task"]`).
A seed fixes the episode (ball, colour, instruction, stiffness, start shape) exactly as for
`scripts/eval_soft_arm.py`, so both evaluate the same episodes. Reward: minus the tip-to-ball
distance in metres after each step (the return is what `eval_soft_arm.py` reports as `return`);
`info["is_success"]` once the tip has held the ball. `gymnasium.make(ENV_ID, max_episode_steps=N)`
adds the time limit.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lib.envs.soft_arm.features import GRAPH_KEY, IMAGE_KEY, NODE_FEATURES, STATE_KEY
from lib.envs.soft_arm.sim import CONTROL_HZ, NUM_SEGMENTS, SoftArmSim

ENV_ID = "gym_soft_arm/SoftArm-v0"
CAMERA = "front"  # observation.images.front


class SoftArmEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, image_size: int = 224, render_mode: str | None = "rgb_array") -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r}: the soft arm renders only 'rgb_array'")
        self.render_mode = render_mode
        self.sim = SoftArmSim(image_size)
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Dict({CAMERA: spaces.Box(0, 255, (image_size, image_size, 3), dtype=np.uint8)}),
                "agent_pos": spaces.Box(-1.0, 1.0, (NUM_SEGMENTS,), dtype=np.float32),
                "graph": spaces.Box(-np.inf, np.inf, (NUM_SEGMENTS, NODE_FEATURES), dtype=np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (NUM_SEGMENTS,), dtype=np.float32)
        self.task_description = ""

    def _observation(self, observation: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            "pixels": {CAMERA: observation[IMAGE_KEY]},
            "agent_pos": observation[STATE_KEY],
            "graph": observation[GRAPH_KEY],
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Any], dict]:
        super().reset(seed=seed)
        # The episode's seed: the one given, else the next from the env's generator (Gymnasium's
        # autoreset calls reset() without one).
        episode_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        observation = self.sim.reset(episode_seed)
        self.task_description = self.sim.task.instruction
        return self._observation(observation), {"is_success": False, "task": self.task_description}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict]:
        observation, success = self.sim.step(action)
        info = {"is_success": success, "task": self.task_description}
        return self._observation(observation), -self.sim.tip_distance(), success, False, info

    def render(self) -> np.ndarray:
        return self.sim.render()

    def close(self) -> None:
        self.sim.close()


def register() -> None:
    """Make `gymnasium.make(ENV_ID)` build a `SoftArmEnv` (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=SoftArmEnv)
