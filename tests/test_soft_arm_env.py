"""The soft arm as a Gymnasium env, and LeRobot's own evaluation (`lerobot-eval`) of a graph
checkpoint on it through the env plugin `plugins/lerobot_env_soft_arm` (installed by `make install`)."""

import json
import os

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env
from helpers import PYTHON, REPO, fake_hub_tokenizer, run

from lib.envs.soft_arm.features import IMAGE_KEY
from lib.envs.soft_arm.gym_env import ENV_ID, SoftArmEnv, register
from lib.envs.soft_arm.sim import SoftArmSim
from lib.policies.graph_pi0 import GRAPH_KEY

IMAGE = 64

# A tiny graph checkpoint with processors whose tokenizer is named by hub id (LeRobot rebuilds it by
# that name); run with HF_HUB_CACHE pointing at a hand-built cache that holds it.
MAKE_CHECKPOINT = """
import sys
import torch
from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphConfig, PI0GraphPolicy
from lib.policies.loading import make_pi0_policy
from lib.policies.processors import load_tokenizer, make_pi0_processors
from lib.data.soft_arm import IMAGE_KEY

checkpoint, image, n_action_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = PI0GraphConfig(
    model_size="tiny",
    chunk_size=16,
    n_action_steps=n_action_steps,  # LeRobot's action queue: a new chunk every n_action_steps
    device="cpu",
    input_features={
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, image, image)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(10,)),
        GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(10, 19)),
    },
    output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(10,))},
    normalization_mapping={kind: NormalizationMode.IDENTITY for kind in ("VISUAL", "STATE", "ACTION")},
)
torch.manual_seed(0)
make_pi0_policy("tiny", config, PI0GraphPolicy).save_pretrained(checkpoint)
tokenizer = load_tokenizer("someone/tiny-tokenizer")
for pipeline in make_pi0_processors(config, tokenizer):
    pipeline.save_pretrained(checkpoint)
tokenizer.save_pretrained(checkpoint)
"""


def test_gymnasium_env_follows_the_api_and_replays_the_simulator():
    env = SoftArmEnv(image_size=IMAGE)
    check_env(env, skip_render_check=False)
    observation, info = env.reset(seed=7)
    sim = SoftArmSim(IMAGE)
    expected = sim.reset(7)
    assert env.task_description == sim.task.instruction == info["task"]
    assert np.array_equal(observation["pixels"]["front"], expected[IMAGE_KEY])
    assert np.array_equal(observation["graph"], expected[GRAPH_KEY])
    command = np.linspace(-0.5, 0.5, 10, dtype=np.float32)
    observation, reward, terminated, truncated, info = env.step(command)
    expected, success = sim.step(command)
    assert np.array_equal(observation["agent_pos"], expected["observation.state"])
    assert reward == -sim.tip_distance() and terminated == success == info["is_success"] and not truncated
    assert env.render().shape == (IMAGE, IMAGE, 3)
    register()
    limited = gym.make(ENV_ID, image_size=IMAGE, max_episode_steps=2)
    limited.reset(seed=7)
    assert limited.step(command)[3] is False and limited.step(command)[3] is True  # truncated at the limit
    for opened in (env, limited):
        opened.close()
    sim.close()


def test_lerobot_eval_runs_a_graph_checkpoint_and_agrees_with_eval_soft_arm(tokenizer_dir, tmp_path):
    """`lerobot-eval --env.type=soft_arm` on a tiny graph checkpoint (tokenizer by hub id from a
    hand-built cache): the same seeds and noise seed give the same episodes as
    scripts/eval_soft_arm.py, down to each episode's return (the summed tip distance)."""
    hub = fake_hub_tokenizer(tokenizer_dir, tmp_path / "hub")
    environment = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    replan_steps, seed = 4, 10_000_000
    checkpoint = tmp_path / "checkpoint"
    run([PYTHON, "-c", MAKE_CHECKPOINT, str(checkpoint), str(IMAGE), str(replan_steps)], env=environment)

    episodes, steps = 2, 12
    run(
        [
            str(REPO / ".venv" / "bin" / "lerobot-eval"),
            f"--policy.path={checkpoint}",
            "--policy.device=cpu",
            "--env.type=soft_arm",
            f"--env.image_size={IMAGE}",
            f"--env.episode_length={steps}",
            f"--eval.n_episodes={episodes}",
            "--eval.batch_size=1",  # one episode after the other, as --num_envs 1 below
            f"--seed={seed}",
            f"--output_dir={tmp_path / 'lerobot_eval'}",
        ],
        env=environment,
    )
    (task,) = json.loads((tmp_path / "lerobot_eval" / "eval_info.json").read_text())["per_task"]
    theirs = task["metrics"]  # episode i ran on seed `--seed` + i
    assert len(list((tmp_path / "lerobot_eval" / "videos").rglob("*.mp4"))) == episodes

    arguments = ["--checkpoint", str(checkpoint), "--num_episodes", str(episodes), "--num_envs", "1"]
    arguments += ["--replan_steps", str(replan_steps), "--max_steps", str(steps), "--image_size", str(IMAGE)]
    arguments += ["--seed_start", str(seed), "--seed", str(seed), "--videos", "0"]
    run([PYTHON, "scripts/eval_soft_arm.py", *arguments, "--output_dir", str(tmp_path / "ours")], env=environment)
    ours = json.loads((tmp_path / "ours" / "summary.json").read_text())["per_episode"]
    assert [e["seed"] for e in ours] == [seed, seed + 1]
    assert theirs["successes"] == [e["success"] for e in ours]
    np.testing.assert_allclose(theirs["sum_rewards"], [e["return"] for e in ours], rtol=1e-9)
