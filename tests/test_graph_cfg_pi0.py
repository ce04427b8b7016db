"""The graph pi0 with the optimality flag (lib/policies/flag_pi0.py), composed from the two extensions."""

import pytest
import torch
from helpers import make_batch, make_config

from lib.policies.flag_pi0 import PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphPolicy
from lib.policies.loading import load_pretrained_policy, make_pi0_policy


@pytest.fixture(scope="module")
def bc_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bc_graph")
    torch.manual_seed(0)
    make_pi0_policy("tiny", make_config(), PI0GraphPolicy).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("with_graph", [True, False])
@pytest.mark.parametrize("guidance_weight", [1.0, 2.5])
def test_starts_as_the_bc_policy(bc_checkpoint, tmp_path, with_graph, guidance_weight):
    """Loaded from a BC graph checkpoint, the flag embedding is zero: the policy acts exactly as the
    BC policy, with or without a graph in the batch, at any guidance weight (both branches agree)."""
    bc = PI0GraphPolicy.from_pretrained(bc_checkpoint)
    config = PI0GraphCFGConfig.from_config(bc.config, guidance_weight=guidance_weight)
    policy = load_pretrained_policy(bc_checkpoint, PI0GraphCFGPolicy, config)
    assert torch.count_nonzero(policy.model.condition_embedding.weight) == 0
    batch = make_batch()
    if not with_graph:
        del batch[GRAPH_KEY]
    noise = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    expected = bc.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), expected, rtol=1e-5, atol=1e-5)
    # It saves and loads as its own type.
    policy.save_pretrained(tmp_path)
    reloaded = PI0GraphCFGPolicy.from_pretrained(tmp_path)
    assert reloaded.config.guidance_weight == guidance_weight
    assert torch.equal(
        reloaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def test_cfg_rl_update_reaches_the_flag_and_the_graph_encoder(bc_checkpoint):
    config = PI0GraphCFGConfig.from_config(PI0GraphPolicy.from_pretrained(bc_checkpoint).config)
    policy = load_pretrained_policy(bc_checkpoint, PI0GraphCFGPolicy, config)
    batch = make_batch()
    noise, time = torch.randn(2, 16, 32), torch.rand(2)
    loss, info = policy(batch, torch.tensor([1.0, -1.0]), noise, time, objective="cfg_rl", alpha=0.1)
    loss.backward()
    assert policy.model.condition_embedding.weight.grad[1].abs().sum() > 0  # the optimal flag's row
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.graph_encoder.parameters())
    # behaviour cloning (the no-reward control) is the advantage-filtered loss with every window kept
    bc_loss, _ = policy(batch, torch.tensor([1.0, -1.0]), noise, time, objective="behavior_cloning")
    all_loss, _ = policy(batch, torch.tensor([1.0, 1.0]), noise, time, objective="advantage_filtered")
    assert torch.equal(bc_loss, all_loss)
