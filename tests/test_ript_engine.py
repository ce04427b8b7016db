"""The RIPT engine's update step (lib.rl.ript.run_update) on the real tiny flag-conditioned pi0, in
this process: no simulator, no launcher."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from lib.envs.libero.worker import AGENTVIEW_KEY, STATE_KEY, WRIST_KEY
from lib.envs.vector_rollout import Window
from lib.policies.factories import make_ript_policy
from lib.rl.ript import run_update, set_iteration_lr
from lib.run.faults import NONFINITE_LOSS_ENV
from lib.run.guards import NonFiniteError, NonFiniteGuard
from lib.run.schemas import ModelConfig, RLConfig, RLOptimConfig

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


def update(
    policy_and_preprocessor, advantages, objective, seed=0, nonfinite=None, minibatch_size=4, accumulation=1, sgd=False
):
    """A copy of the policy after one iteration's update (AdamW, or plain SGD); and the losses."""
    policy, preprocessor = policy_and_preprocessor
    policy = copy.deepcopy(policy)
    if sgd:  # linear in the gradient: equal gradients give equal weights (AdamW amplifies rounding where g ~ 0)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    accelerator = Accelerator(cpu=True)
    rl = RLConfig(objective=objective, update_epochs=2, minibatch_size=minibatch_size)
    rl = OmegaConf.structured(dataclasses.replace(rl, gradient_accumulation_steps=accumulation))
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


def test_accumulated_minibatches_equal_one_step_at_their_union(policy_and_preprocessor):
    """rl.gradient_accumulation_steps=2 over minibatches of 2 against minibatches of 4: the same
    windows in the same order, each with the same noise (keyed by window), so the same optimizer
    steps to rounding (with SGD, whose step is linear in the gradient); stepping after every
    minibatch of 2 gives other weights."""
    advantages = [0.5, -0.5, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5]
    union, union_losses = update(policy_and_preprocessor, advantages, "cfg_rl", minibatch_size=4, sgd=True)
    accumulated, losses = update(
        policy_and_preprocessor, advantages, "cfg_rl", minibatch_size=2, accumulation=2, sgd=True
    )
    assert len(union_losses) == 4 and len(losses) == 8  # minibatches; 4 optimizer steps in both
    torch.testing.assert_close(torch.stack(losses).view(4, 2).mean(1), torch.stack(union_losses))
    for name, value in union.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    stepping, _ = update(policy_and_preprocessor, advantages, "cfg_rl", minibatch_size=2, sgd=True)
    assert not torch.allclose(
        stepping.state_dict()["model.state_proj.weight"], union.state_dict()["model.state_proj.weight"]
    )


def test_iteration_learning_rate_warms_up_and_decays():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    constant = RLOptimConfig(lr=1e-4, warmup_iterations=2)
    rates = [set_iteration_lr(optimizer, constant, i, 10) for i in (1, 2, 3, 10)]
    assert rates == pytest.approx([5e-5, 1e-4, 1e-4, 1e-4])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    decaying = RLOptimConfig(lr=1e-4, warmup_iterations=0, decay_lr=1e-5)
    rates = [set_iteration_lr(optimizer, decaying, i, 11) for i in range(1, 12)]
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-5)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


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


def test_lora_moves_the_adapters_and_the_flag_only_and_saves_a_plain_policy(policy_and_preprocessor, tmp_path):
    """`model.lora_rank` of train_ript_pi0.py: one update through run_update moves only the adapters
    (LeRobot's pi0 targets) and the optimality flag's embedding (new on a pi0, so it trains in
    full); the checkpoint is a plain pi0_cfg policy with the adapters merged, acting as the LoRA
    model did."""
    from lib.policies.flag_pi0 import PI0CFGPolicy
    from lib.policies.lora import add_lora_adapters, base_policy
    from lib.policies.policy_fn import observations_to_batch
    from lib.run.checkpoint import save_policy_checkpoint
    from lib.run.optim import make_optimizer

    policy, preprocessor = policy_and_preprocessor
    lora = add_lora_adapters(copy.deepcopy(policy), rank=4)
    before = {name: p.detach().clone() for name, p in lora.named_parameters()}
    optimizer = make_optimizer(lora, RLOptimConfig(lr=1e-2))
    rl = OmegaConf.structured(RLConfig(objective="cfg_rl", update_epochs=1, minibatch_size=4))
    accelerator = Accelerator(cpu=True)
    losses = run_update(accelerator, lora, optimizer, preprocessor, windows(6), [0.5, -0.5] * 3, rl, 1.0, 0, 3)
    assert len(losses) == 2
    moved = {name for name, p in lora.named_parameters() if not torch.equal(p, before[name])}
    assert all(".lora_" in name or ".condition_embedding.modules_to_save." in name for name in moved), moved
    assert any(".lora_B." in name for name in moved) and any(".condition_embedding." in name for name in moved)

    checkpoint = save_policy_checkpoint(accelerator, tmp_path, 1, lora, extras=[])
    merged = PI0CFGPolicy.from_pretrained(checkpoint / "pretrained_model")
    batch = preprocessor(observations_to_batch([window.observation for window in windows(2)]))
    noise = torch.randn(2, CHUNK, 32, generator=torch.Generator().manual_seed(1))
    base_policy(lora).eval()
    torch.testing.assert_close(
        merged.predict_action_chunk(batch, noise=noise),
        base_policy(lora).predict_action_chunk(batch, noise=noise),
        rtol=1e-5,
        atol=1e-5,
    )
