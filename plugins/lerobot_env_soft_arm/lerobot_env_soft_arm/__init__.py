"""LeRobot env plugin for this repository's simulated soft arm.

Importing it registers the env type `soft_arm` with LeRobot's `EnvConfig` registry and the
Gymnasium id `gym_soft_arm/SoftArm-v0` (`lib.envs.soft_arm.gym_env.SoftArmEnv`), so

    lerobot-eval --policy.path=CHECKPOINT --env.type=soft_arm --eval.n_episodes=50 --eval.batch_size=10

evaluates a `pi0_graph` checkpoint of `scripts/train_soft_arm.py` (the policy plugin
`lerobot_policy_pi0_graph` opens it) on the seeds `--seed`, `--seed`+1, ... LeRobot's scripts
import the plugin themselves (`register_third_party_plugins`).
"""

from dataclasses import dataclass, field

from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_STATE

from lib.envs.soft_arm.features import GRAPH_KEY, IMAGE_KEY, NODE_FEATURES
from lib.envs.soft_arm.gym_env import CAMERA, ENV_ID, register
from lib.envs.soft_arm.sim import CONTROL_HZ, MAX_STEPS, NUM_SEGMENTS

register()


@EnvConfig.register_subclass("soft_arm")
@dataclass
class SoftArmEnvConfig(EnvConfig):
    """`--env.image_size` must be the image size the policy was trained on (the dataset's);
    `--env.episode_length` is the step limit (10 steps per second)."""

    task: str | None = ENV_ID.split("/")[1]
    fps: int = CONTROL_HZ
    episode_length: int = MAX_STEPS
    image_size: int = 224
    features: dict[str, PolicyFeature] = field(default_factory=dict)
    features_map: dict[str, str] = field(
        default_factory=lambda: {
            ACTION: ACTION,
            "agent_pos": OBS_STATE,
            f"pixels/{CAMERA}": IMAGE_KEY,
            "graph": GRAPH_KEY,
        }
    )

    def __post_init__(self) -> None:
        self.features = {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(NUM_SEGMENTS,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(NUM_SEGMENTS,)),
            f"pixels/{CAMERA}": PolicyFeature(type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)),
            "graph": PolicyFeature(type=FeatureType.STATE, shape=(NUM_SEGMENTS, NODE_FEATURES)),
        }

    @property
    def gym_kwargs(self) -> dict:
        return {"image_size": self.image_size, "max_episode_steps": self.episode_length}


__all__ = ["SoftArmEnvConfig"]
