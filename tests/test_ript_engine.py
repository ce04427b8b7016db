"""The RIPT engine's update step (lib.ript.run_update) on the real tiny flag-conditioned pi0, in
this process: no simulator, no launcher."""

import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from lib.checkpoint import NONFINITE_LOSS_ENV, NonFiniteError, NonFiniteGuard
from lib.libero import AGENTVIEW_KEY, STATE_KEY, WRIST_KEY, make_ript_policy
from lib.ript import run_update
from lib.rollout import Window
from lib.schemas import ModelConfig, RLConfig

CHUNK = 8


@pytest.fixture(scope="module")
def policy_and_preprocessor(tokenizer_dir):
    model = OmegaConf.structured(ModelConfig(pretrained="tiny", tokenizer=str(tokenizer_dir), chunk_size=CHUNK))
    model.image_size = 32
    torch.manual_seed(0)
    policy, preprocessor, _, _ = make_ript_policy(model, "cpu")
    return policy, preprocessor


def windows(count: int) -> list[Window]:
    rng = np.random.default_rng(0)
    observation = lambda: {  # noqa: E731
        AGENTVIEW_KEY: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
        WRIST_KEY: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
        STATE_KEY: rng.normal(size=8).astype(np.float32),
        "task": "pick up the black bowl",
    }
    return [Window(observation(), rng.uniform(-1, 1, (CHUNK, 7)).astype(np.float32), executed=4) for _ in range(count)]


def update(policy_and_preprocessor, advantages, objective, seed=0, nonfinite=None):
    """A copy of the policy after one iteration's update; and the losses."""
    policy, preprocessor = policy_and_preprocessor
    policy = copy.deepcopy(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    rl = OmegaConf.structured(RLConfig(objective=objective, update_epochs=2, minibatch_size=4))
    losses = run_update(
        accelerator,
        policy,
        optimizer,
        preprocessor,
        windows(len(advantages)),
        advantages,
        rl,
        1.0,
        seed,
        iteration=3,
        nonfinite=nonfinite,
    )
    return policy, losses


def test_steps_determinism_and_what_changes(policy_and_preprocessor):
    before = policy_and_preprocessor[0].state_dict()
    advantages = [0.5, -0.5, 0.5, -0.5, 0.5, -0.5]
    policy, losses = update(policy_and_preprocessor, advantages, "cfg_rl")
    assert len(losses) == 2 * 2  # update_epochs * ceil(6 windows / minibatch 4)
    assert all(torch.isfinite(loss) for loss in losses)
    after = policy.state_dict()
    assert not torch.equal(after["model.state_proj.weight"], before["model.state_proj.weight"])
    flag = after["model.condition_embedding.weight"]
    assert flag[1].abs().sum() > 0  # the optimal flag learned from the positive windows
    # The same seed and iteration give the same weights: a resumed run repeats the uninterrupted one.
    again, _ = update(policy_and_preprocessor, advantages, "cfg_rl")
    assert all(torch.equal(after[k], v) for k, v in again.state_dict().items())
    other, _ = update(policy_and_preprocessor, advantages, "cfg_rl", seed=1)
    assert not torch.equal(other.state_dict()["model.state_proj.weight"], after["model.state_proj.weight"])


def test_no_positive_window_leaves_the_weights(policy_and_preprocessor):
    """advantage_filtered with no A > 0: zero loss, zero gradients, and AdamW (no weight decay)
    moves nothing: the update cannot change a policy that earned nothing."""
    before = policy_and_preprocessor[0].state_dict()
    policy, losses = update(policy_and_preprocessor, [0.0, -0.5, 0.0, -0.5], "advantage_filtered")
    assert len(losses) == 2 and all(loss == 0 for loss in losses)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_no_window_no_update(policy_and_preprocessor):
    policy, losses = update(policy_and_preprocessor, [], "cfg_rl")
    assert losses == []


def test_nonfinite_update_steps_are_skipped_then_stop(policy_and_preprocessor, monkeypatch):
    """A NaN loss at every update step: no step reaches the weights, each is counted; with a limit
    of 2 in a row the update stops with the config key named."""
    monkeypatch.setenv(NONFINITE_LOSS_ENV, "1,2,3,4")
    before = policy_and_preprocessor[0].state_dict()
    guard = NonFiniteGuard(10, "rl.max_nonfinite_steps")
    policy, losses = update(policy_and_preprocessor, [0.5, -0.5, 0.5, -0.5], "cfg_rl", nonfinite=guard)
    assert len(losses) == 2 and guard.pop_skipped() == 2
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    with pytest.raises(NonFiniteError, match=r"rl\.max_nonfinite_steps=2"):
        update(
            policy_and_preprocessor,
            [0.5, -0.5, 0.5, -0.5],
            "cfg_rl",
            nonfinite=NonFiniteGuard(2, "rl.max_nonfinite_steps"),
        )
