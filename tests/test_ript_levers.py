"""The RL engine's levers past the plateau (issue 28): per-window critic advantages, exploration of
the states whose rollouts all failed, demonstrations as the update's anchor. Hand-made episodes and
groups (the rollout noise on the real tiny pi0 is in test_ript.py)."""

import numpy as np
import pytest
import torch

from lib.envs.vector_rollout import Window
from lib.rl.critic import critic_window_advantages, window_features
from lib.rl.demos import check_demonstrations, demo_minibatch, join_batches
from lib.rl.ript import StateOutcomeHistory, collect_informative_groups
from lib.run.errors import UserError
from lib.run.keys import stable_key


class Episode:
    def __init__(self, windows, success):
        self.windows, self.success = windows, success


def reaching_episode(start: float, step: float, windows: int = 4) -> Episode:
    """A 1-D reach: the 'distance' observation moves by `step` per window from `start`; a success
    ends closer than 0.5."""
    distances = start + step * np.arange(windows)
    made = [
        Window(observation={"observation.distance": np.array([d], np.float32), "task": "t"}, actions=None, executed=2)
        for d in distances
    ]
    return Episode(made, success=bool(distances[-1] + step < 0.5))


def test_window_features_are_the_non_image_observation_and_the_steps_elapsed():
    windows = [
        Window(
            observation={
                "observation.images.front": np.zeros((4, 4, 3), np.uint8),
                "observation.state": np.array([1.0, 2.0], np.float32),
                "observation.graph": np.ones((2, 2), np.float32),
                "task": "reach",
            },
            actions=None,
            executed=executed,
        )
        for executed in (8, 3)
    ]
    features = window_features(windows)
    assert features.shape == (2, 2 * 2 + 2 + 1)  # graph, state (sorted by key), steps elapsed
    assert features[:, -1].tolist() == [0.0, 8.0] and features[0, 4:6].tolist() == [1.0, 2.0]


def test_critic_ranks_the_windows_of_groups_that_all_failed():
    """Successes start near; in a failed group, the windows that moved toward the goal gain value,
    so they are the positives, and exactly the top fraction of windows is positive."""
    rng = np.random.default_rng(0)
    rolled = []
    for index in range(40):  # groups of K=4 from states at several distances, steps both ways
        start = rng.uniform(0.5, 3.0)
        episodes = [reaching_episode(start, rng.choice([-0.6, -0.3, 0.1, 0.3])) for _ in range(4)]
        rewards = torch.tensor([float(e.success) for e in episodes])
        rolled.append(({"episodes": episodes, "seed": index}, rewards))
    failed = [group for group in rolled if not bool(group[1].any())]
    assert len(failed) >= 4
    windows, advantages, figures = critic_window_advantages(failed, rolled, 0.3, ridge=1.0)
    assert len(windows) == sum(len(e.windows) for g in failed for e in g[0]["episodes"])
    positive = np.array(advantages) > 0
    assert abs(positive.mean() - 0.3) < 0.05
    # each window's move: the next window's distance minus its own (the last one repeats its step)
    moves = []
    for state, _ in failed:
        for episode in state["episodes"]:
            distances = [w.observation["observation.distance"][0] for w in episode.windows]
            moves += list(np.diff(distances)) + [distances[-1] - distances[-2]]
    moves = np.array(moves)
    assert moves[positive].mean() < moves[~positive].mean()  # positives moved toward the goal
    assert figures["critic_explained_variance"] > 0.2  # the held-out fold is predicted
    # A closed-form fit: the same groups give the same advantages.
    again = critic_window_advantages(failed, rolled, 0.3, ridge=1.0)[1]
    assert again == advantages


def test_collection_keeps_failed_groups_explores_them_and_keeps_the_budget():
    outcomes = {0: [1, 1, 1, 1], 1: [0, 0, 0, 0], 2: [1, 0, 0, 0], 3: [0, 0, 0, 0], 4: [0, 1, 0, 0], 5: [1, 0, 1, 1]}
    draws = iter([[0, 1], [2, 3], [4, 5]])
    explored_calls = []

    def rollout(states):
        return torch.tensor([outcomes[s] for s in states], dtype=torch.float32)

    def explore(states):  # the noisy re-roll of a failed state finds one success
        explored_calls.append(list(states))
        return torch.tensor([[0, 0, 1, 0]] * len(states), dtype=torch.float32)

    rolled = []
    kept, stats = collect_informative_groups(
        lambda: [dict(seed=s) for s in next(draws)],
        lambda states: rollout([s["seed"] for s in states]),
        lambda s: s["seed"],
        StateOutcomeHistory(),
        target_groups=10,
        max_rounds=3,
        keep_failed=True,
        explore=explore,
        max_groups=7,
        rolled=rolled,
    )
    # round 1: 0 dropped (all success), 1 kept (failed) and re-rolled; round 2: 2, 3 kept, 3 re-rolled;
    # then the budget of 7 groups is spent: round 3 draws 4, 5 but only 4 fits, and no re-roll.
    assert [s["seed"] for s, _ in rolled] == [0, 1, 1, 2, 3, 3, 4]
    assert [[s["seed"] for s in call] for call in explored_calls] == [[1], [3]]
    assert [s["seed"] for s, _ in kept] == [1, 1, 2, 3, 3, 4]
    assert (stats.explored_groups, stats.explored_successes, stats.dropped_all_success) == (2, 2, 1)
    assert stats.groups_rolled_out == 7
    explored = [s for s, _ in rolled[2:3]][0]
    assert explored is not rolled[1][0]  # a re-roll is a copy: each group keeps its own episodes


class Demos(torch.utils.data.Dataset):
    def __init__(self, frames=5):
        self.frames = frames

    def __len__(self):
        return self.frames

    def __getitem__(self, index):
        return {
            "observation.state": torch.full((3,), float(index)),
            "action": torch.full((4, 2), float(index)),
            "action_is_pad": torch.zeros(4, dtype=torch.bool),
            "task": f"demo {index}",
            "index": torch.tensor(index),
        }


def test_demonstrations_join_the_window_batch_drawn_by_key():
    drawn = demo_minibatch(Demos(), 3, 0, 1, 2)
    assert torch.equal(drawn["action"], demo_minibatch(Demos(), 3, 0, 1, 2)["action"])  # a function of its key
    assert not all(torch.equal(demo_minibatch(Demos(), 3, 0, 1, s)["index"], drawn["index"]) for s in range(3, 8))
    windows = {
        "observation.state": torch.zeros(2, 3),
        "action": torch.zeros(2, 4, 2),
        "action_is_pad": torch.ones(2, 4, dtype=torch.bool),
        "task": ["a", "b"],
    }
    joined = join_batches(windows, drawn)
    assert set(joined) == set(windows) and joined["task"][:2] == ["a", "b"] and len(joined["task"]) == 5
    assert joined["action"].shape == (5, 4, 2) and torch.equal(joined["action"][2:], drawn["action"])


def test_a_demonstration_dataset_must_carry_what_the_policy_takes():
    from lerobot.configs import FeatureType, PolicyFeature

    features = {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(3,))}
    check_demonstrations(Demos(), features, (4, 2), "demos")
    with pytest.raises(UserError, match=r"action chunks of shape \(4, 2\), the policy's are \(8, 2\)"):
        check_demonstrations(Demos(), features, (8, 2), "d")
    with pytest.raises(UserError, match=r"'observation.state' has shape \(3,\), the policy expects \(4,\)"):
        check_demonstrations(
            Demos(), {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(4,))}, (4, 2), "d"
        )
    graph = {**features, "observation.graph": PolicyFeature(type=FeatureType.STATE, shape=(10, 19))}
    with pytest.raises(UserError, match=r"rl.demo_dataset d: no 'observation.graph'"):
        check_demonstrations(Demos(), graph, (4, 2), "d")
    with pytest.raises(UserError, match="no frames"):
        check_demonstrations(Demos(0), features, (4, 2), "d")


def test_stable_key_is_a_63_bit_function_of_its_parts_and_their_types():
    key = stable_key("demos", 0, 1, 2)
    assert key == stable_key("demos", 0, 1, 2) and 0 <= key < 2**63
    assert len({key, stable_key("demos", 0, 1, 3), stable_key("demos", 0, 12), stable_key("demos", "0", 1, 2)}) == 4


def test_the_results_split_each_policy_by_what_the_start_solved(tmp_path, monkeypatch, capsys):
    """ript_soft_arm_results.py: success on the held-out tasks the start never / sometimes / always
    solved, from 8-attempt evaluations (here 2 attempts of 3 seeds, written by hand)."""
    import json

    from helpers import exit_in_process

    def evaluation(name, outcomes):  # outcomes: per task, its attempts
        episodes = [{"seed": seed, "success": bool(s)} for seed, row in outcomes.items() for s in row]
        summary = {
            "episodes": len(episodes),
            "attempts": 2,
            "success_rate": float(np.mean([e["success"] for e in episodes])),
            "pass_at_attempts": float(np.mean([any(row) for row in outcomes.values()])),
            "per_episode": episodes,
        }
        (tmp_path / "pass_at_8" / name).mkdir(parents=True)
        (tmp_path / "pass_at_8" / name / "summary.json").write_text(json.dumps(summary))

    evaluation("bc_few20", {1: [0, 0], 2: [1, 0], 3: [1, 1]})  # never, sometimes, always
    evaluation("rl_seed0", {1: [1, 0], 2: [1, 1], 3: [1, 0]})
    (tmp_path / "arm" / "seed0").mkdir(parents=True)
    run = {"success_before": 0.5, "success_after": 0.6, "curve": {"0": 0.5, "1": 0.6}, "episodes_used": 8}
    (tmp_path / "arm" / "seed0" / "summary.json").write_text(json.dumps({**run, "cpu_minutes": 1.0}))
    code, _ = exit_in_process(monkeypatch, capsys, "scripts/ript_soft_arm_results.py", "--runs_dir", str(tmp_path))
    assert code == 0
    rows = (tmp_path / "pass_at_8" / "split.md").read_text().splitlines()
    assert "never tasks (1)" in rows[0] and "always tasks (1)" in rows[0]
    assert rows[2] == "| bc_few20 | 50.0% | 67% | 0.0% | 50.0% | 100.0% |"
    assert rows[3] == "| rl_seed0 | 66.7% | 100% | 50.0% | 100.0% | 50.0% |"
