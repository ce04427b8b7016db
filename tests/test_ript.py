"""RIPT pieces on hand-made groups, and the RL objectives on the real tiny pi0."""

import json

import numpy as np
import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature

from lib.policies.flag_pi0 import NULL_FLAG, OPTIMAL_FLAG, PI0CFGConfig, PI0CFGPolicy
from lib.policies.noise import seeded_noise_and_time
from lib.rl.objectives import rollout_noise
from lib.rl.ript import (
    RIPTProgress,
    StateOutcomeHistory,
    collect_informative_groups,
    is_informative,
    leave_one_out_advantages,
)


def test_leave_one_out_advantages_exact():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(leave_one_out_advantages(rewards), expected)
    assert torch.allclose(leave_one_out_advantages(torch.tensor([[3.0, 1.0]])), torch.tensor([[2.0, -2.0]]))
    with pytest.raises(ValueError, match=r"\(groups, K\) with K >= 2"):
        leave_one_out_advantages(torch.tensor([[1.0], [0.0]]))


def test_is_informative():
    assert is_informative(torch.tensor([1.0, 0.0, 1.0]))
    assert not is_informative(torch.tensor([1.0, 1.0, 1.0]))
    assert not is_informative(torch.tensor([0.0, 0.0]))


def test_history_skips_states_solved_in_a_row_then_retries():
    history = StateOutcomeHistory(skip_after=3, skip_for=2)
    solved, mixed = torch.ones(4), torch.tensor([1.0, 0.0, 1.0, 1.0])
    for _ in range(2):
        history.record((0, 1), solved)
    history.record((0, 1), mixed)  # a failure breaks the streak
    for _ in range(2):
        history.record((0, 1), solved)
    assert not history.take_skip((0, 1))
    history.record((0, 1), solved)  # third in a row
    assert [history.take_skip((0, 1)) for _ in range(3)] == [True, True, False]
    restored = StateOutcomeHistory(skip_after=3, skip_for=2)
    history.record((5, 7), solved)
    history.record(20_000_003, solved)  # the soft arm's keys are tasks
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))  # as a checkpoint stores it
    assert restored.solved_streak == history.solved_streak and restored.skips_left == history.skips_left


def test_collect_refills_until_enough_informative_groups():
    # Init states are ints; each one's K=4 outcomes are fixed by hand.
    outcomes = {0: [1, 1, 1, 1], 1: [0, 0, 0, 0], 2: [1, 0, 0, 0], 3: [1, 1, 0, 1], 4: [0, 1, 0, 0], 5: [0, 0, 0, 0]}
    draws = iter([[0, 1], [2, 3], [4, 5]])
    rolled = []

    def rollout(states):
        rolled.extend(states)
        return torch.tensor([outcomes[s] for s in states], dtype=torch.float32)

    kept, stats = collect_informative_groups(
        lambda: next(draws), rollout, lambda s: (0, s), StateOutcomeHistory(), target_groups=3, max_rounds=10
    )
    assert [state for state, _ in kept] == [2, 3, 4]
    assert rolled == [0, 1, 2, 3, 4, 5]
    assert (stats.rounds, stats.dropped_all_success, stats.dropped_all_failure) == (3, 1, 2)


def test_collect_stops_at_round_limit_and_never_loops_on_a_solved_task():
    history = StateOutcomeHistory(skip_after=1, skip_for=100)

    def rollout(states):
        return torch.ones(len(states), 4)  # everything always solved: no group is informative

    kept, stats = collect_informative_groups(
        lambda: [0, 1], rollout, lambda s: (0, s), history, target_groups=2, max_rounds=5
    )
    assert kept == [] and stats.rounds == 5
    # After round 1 every drawn state rests, so each draw is rolled out anyway (progress guaranteed).
    assert stats.groups_rolled_out == 10 and stats.skipped_states == 0


def test_collect_skips_resting_states_while_others_remain():
    history = StateOutcomeHistory(skip_after=1, skip_for=1)
    history.record((0, 0), torch.ones(2))  # state 0 rests for one draw
    rollout_calls = []

    def rollout(states):
        rollout_calls.append(list(states))
        return torch.tensor([[1.0, 0.0]] * len(states))

    kept, stats = collect_informative_groups(
        lambda: [0, 1], rollout, lambda s: (0, s), history, target_groups=3, max_rounds=3
    )
    assert rollout_calls == [[1], [0, 1]] and stats.skipped_states == 1 and len(kept) == 3


# --- Objectives on the tiny pi0 ------------------------------------------------------------------

BATCH, CHUNK = 4, 8


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = PI0CFGConfig(
        model_size="tiny",
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        device="cpu",
        guidance_weight=1.5,
        input_features={
            "observation.images.agentview": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64)),
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
    )
    policy = PI0CFGPolicy(config)
    with torch.no_grad():  # a trained-looking flag embedding, so the two branches differ
        policy.model.condition_embedding.weight.normal_(0, 0.5)
    return policy


def make_batch():
    generator = torch.Generator().manual_seed(1)
    return {
        "observation.images.agentview": torch.rand(BATCH, 3, 64, 64, generator=generator),
        "observation.state": torch.randn(BATCH, 8, generator=generator),
        "action": torch.randn(BATCH, CHUNK, 7, generator=generator),
        "observation.language.tokens": torch.randint(0, 500, (BATCH, 10), generator=generator),
        "observation.language.attention_mask": torch.ones(BATCH, 10, dtype=torch.bool),
    }


def test_cfg_rl_loss_is_the_formula_and_reaches_the_condition_token(policy):
    batch, advantages = make_batch(), torch.tensor([0.5, -0.5, 0.0, 1.0])
    noise, time = seeded_noise_and_time(policy.model, BATCH, seed=2, device="cpu")
    policy.zero_grad()
    loss, info = policy(batch, advantages, noise, time, objective="cfg_rl", alpha=0.1)
    loss.backward()
    with torch.no_grad():
        cond = policy.flow_losses(batch, torch.full((BATCH,), OPTIMAL_FLAG), noise, time)
        null = policy.flow_losses(batch, torch.full((BATCH,), NULL_FLAG), noise, time)
    expected = (torch.tensor([1.0, 0.0, 0.0, 1.0]) * cond + 0.1 * null).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and info["positive_fraction"] == 0.5
    grad = policy.model.condition_embedding.weight.grad
    assert torch.isfinite(grad).all() and grad[OPTIMAL_FLAG].abs().sum() > 0 and grad[NULL_FLAG].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_advantage_filtered_loss_uses_only_positive_windows(policy):
    batch, advantages = make_batch(), torch.tensor([0.5, -0.5, 0.0, 1.0])
    noise, time = seeded_noise_and_time(policy.model, BATCH, seed=3, device="cpu")
    loss, _ = policy(batch, advantages, noise, time, objective="advantage_filtered")
    with torch.no_grad():
        null = policy.flow_losses(batch, torch.full((BATCH,), NULL_FLAG), noise, time)
    assert torch.allclose(loss, null[[0, 3]].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="objective must be one of"):
        policy(batch, advantages, noise, time, objective="ppo")


def test_guidance_mixes_the_two_branches(policy):
    batch = make_batch()
    inputs = policy._model_inputs(batch)
    noise, _ = seeded_noise_and_time(policy.model, BATCH, seed=4, device="cpu")
    with policy.model.conditioning(torch.full((BATCH,), OPTIMAL_FLAG)):
        conditional = policy.model.sample_actions(*inputs, noise=noise)
    with policy.model.conditioning(torch.full((BATCH,), NULL_FLAG)):
        unconditional = policy.model.sample_actions(*inputs, noise=noise)
    assert torch.allclose(policy.model.sample_actions_guided(*inputs, 1.0, noise=noise), conditional, atol=1e-5)
    assert torch.allclose(policy.model.sample_actions_guided(*inputs, 0.0, noise=noise), unconditional, atol=1e-5)
    # w = 2 integrates v_null + 2 (v_cond - v_null) at every step: not the mix of the two chunks,
    # but it moves past the conditional chunk, away from the unconditional one.
    guided = policy.model.sample_actions_guided(*inputs, 2.0, noise=noise)
    assert (guided - unconditional).norm() > (conditional - unconditional).norm()
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    assert policy.predict_action_chunk(batch, noise=noise).shape == (BATCH, CHUNK, 7)


def test_rollout_noise_perturbs_guided_sampling_only_inside_the_block(policy):
    batch = make_batch()
    noise, _ = seeded_noise_and_time(policy.model, BATCH, seed=5, device="cpu")
    plain = policy.predict_action_chunk(batch, noise=noise)
    with rollout_noise(policy, 0.2):
        torch.manual_seed(0)
        noisy = policy.predict_action_chunk(batch, noise=noise)
        torch.manual_seed(0)
        again = policy.predict_action_chunk(batch, noise=noise)
    assert torch.equal(noisy, again) and not torch.allclose(noisy, plain, atol=1e-3)
    assert policy.rollout_noise_std == 0.0 and torch.equal(policy.predict_action_chunk(batch, noise=noise), plain)


def test_save_load_round_trip(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = PI0CFGPolicy.from_pretrained(tmp_path)
    assert loaded.config.guidance_weight == 1.5 and loaded.config.model_size == "tiny"
    assert all(
        torch.equal(a, b) for a, b in zip(policy.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_windows_carry_their_rollouts_leave_one_out_advantage():
    from lib.envs.libero.rollout import EpisodeResult
    from lib.envs.libero.worker import AGENTVIEW_KEY, STATE_KEY, WRIST_KEY
    from lib.envs.vector_rollout import Window
    from lib.rl.ript import minibatch_order, window_batch, windows_with_advantages

    def window(executed):
        observation = {
            AGENTVIEW_KEY: np.zeros((8, 8, 3), np.uint8),
            WRIST_KEY: np.full((8, 8, 3), 255, np.uint8),
            STATE_KEY: np.arange(8, dtype=np.float32),
            "task": "t",
        }
        return Window(observation=observation, actions=np.ones((4, 7), np.float32), executed=executed)

    episodes = [EpisodeResult(request={}, success=s, windows=[window(2)] * n) for s, n in ((True, 1), (False, 2))]
    kept = [({"episodes": episodes}, torch.tensor([1.0, 0.0]))]
    windows, advantages = windows_with_advantages(kept)
    assert advantages == [1.0, -1.0, -1.0] and len(windows) == 3

    batches = minibatch_order(num_windows=3, steps=4, minibatch_size=2, seed=0)
    assert len(batches) == 4 and all(len(b) == 2 for b in batches)
    assert sorted(batches[0] + batches[1][:1]) == [0, 1, 2]  # a full shuffled pass before repeating

    batch, batch_advantages = window_batch(windows, advantages, [0, 2], chunk_size=4)
    assert batch_advantages.tolist() == [1.0, -1.0]
    assert batch[AGENTVIEW_KEY].shape == (2, 3, 8, 8) and batch[WRIST_KEY].max() == 1.0
    assert batch["action"].shape == (2, 4, 7) and batch["action_is_pad"][0].tolist() == [False, False, True, True]
    assert batch["task"] == ["t", "t"]


def test_history_merge_takes_in_other_ranks_records():
    mine, theirs = StateOutcomeHistory(skip_after=1, skip_for=2), StateOutcomeHistory(skip_after=1, skip_for=2)
    mine.record((0, 1), torch.ones(2))
    theirs.record((0, 9), torch.ones(2))
    mine.merge([theirs.state_dict()])
    assert set(mine.skips_left) == {(0, 1), (0, 9)}


def test_sampler_positions_are_kept_per_rank():
    """Dynamic sampling makes ranks draw different numbers of batches: each resumes at its own."""
    ranks = [RIPTProgress(rank, 2) for rank in range(2)]
    for rank, draws in zip(ranks, (5, 8), strict=True):
        rank.iteration, rank.draws = 3, draws
    counts = [rank.draws for rank in ranks]  # what gather_object returns on every rank
    for rank in ranks:
        rank.gather_draws(lambda mine: counts)
    state = json.loads(json.dumps(ranks[0].state_dict()))  # the main process writes state.json
    assert state == {"iteration": 3, "draws_by_rank": [5, 8]}
    resumed = [RIPTProgress(rank, 2) for rank in range(2)]
    for rank in resumed:
        rank.load_state_dict(state)
    assert [(r.iteration, r.draws) for r in resumed] == [(3, 5), (3, 8)]
    # Resumed on another number of processes: every rank continues from the furthest position.
    single = RIPTProgress(0, 1)
    single.load_state_dict(state)
    assert single.draws == 8
