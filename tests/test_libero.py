"""LIBERO from the installed package: init-state dataset and vectorized rollouts in real simulators."""

import os
import signal

import numpy as np
import pytest
import torch

from lib.envs.libero.rollout import LiberoInitStateDataset, VectorLiberoRollout, collate_fn_state
from lib.envs.libero.worker import AGENTVIEW_KEY, STATE_KEY, WRIST_KEY, max_steps_of

TASK = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"


def test_init_state_dataset_and_collate():
    dataset = LiberoInitStateDataset("libero_spatial")
    assert len(dataset) == 10 * 50
    one_task = LiberoInitStateDataset("libero_spatial", [TASK], init_indices=[0, 7])
    assert [(item["task_id"], item["init_index"]) for item in one_task] == [(0, 0), (0, 7)]
    batch = collate_fn_state([one_task[0], one_task[1]])
    assert batch["init_state"].shape == (2, 92) and batch["task_id"].tolist() == [0, 0]
    assert batch["instruction"][0].startswith("pick up the black bowl")
    assert not torch.equal(batch["init_state"][0], batch["init_state"][1])
    with pytest.raises(ValueError, match="no task named"):
        LiberoInitStateDataset("libero_spatial", ["fly_to_the_moon"])
    with pytest.raises(ValueError, match="unknown LIBERO benchmark"):
        LiberoInitStateDataset("libero_nowhere")
    assert max_steps_of("libero_10") == 520


def test_camera_keys_are_lerobots():
    """The policy sees LIBERO's cameras under the keys LeRobot's own LIBERO env gives them, so
    checkpoints move between this project and lerobot-eval / LeRobot's LIBERO datasets unchanged."""
    from lerobot.envs.configs import LiberoEnv
    from lerobot.utils.constants import LIBERO_KEY_PIXELS_AGENTVIEW, LIBERO_KEY_PIXELS_EYE_IN_HAND

    features_map = LiberoEnv().features_map
    assert features_map[LIBERO_KEY_PIXELS_AGENTVIEW] == AGENTVIEW_KEY
    assert features_map[LIBERO_KEY_PIXELS_EYE_IN_HAND] == WRIST_KEY


@pytest.mark.slow  # two real LIBERO simulators, one killed and rebuilt: about 70 s on 2 cores
def test_rollouts_batch_policy_calls_and_survive_a_dead_worker():
    requests = [dict(item) for item in LiberoInitStateDataset("libero_spatial", [TASK], init_indices=[0, 1, 2])]
    calls = []
    rollout = VectorLiberoRollout(
        "libero_spatial", num_envs=2, camera_size=64, max_steps=4, replan_steps=2, settle_steps=1
    )
    with rollout as envs:
        victim = envs._workers[1][0].pid

        def policy_fn(observations):
            calls.append(len(observations))
            if len(calls) == 1:  # the simulator of the second env dies mid-episode
                os.kill(victim, signal.SIGKILL)
            for observation in observations:
                assert observation[AGENTVIEW_KEY].shape == observation[WRIST_KEY].shape == (64, 64, 3)
                assert observation[STATE_KEY].shape == (8,) and observation["task"].startswith("pick up")
            return np.zeros((len(observations), 3, 7), dtype=np.float32)

        results = envs.run(requests, policy_fn, record_frames=True)
        assert envs.worker_restarts == 1
    assert calls[0] == 2  # one batched call for both live envs
    assert sorted(r.retries for r in results) == [0, 0, 1]
    for result in results:
        assert result.length == 4 and not result.success
        assert [w.executed for w in result.windows] == [2, 2] and result.windows[0].actions.shape == (3, 7)
        assert len(result.frames) == 4 and result.frames[0].shape == (64, 64, 3)
