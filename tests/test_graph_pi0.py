"""Graph pi0 on the real LeRobot classes at the tiny size."""

import pytest
import torch
from helpers import BATCH, CHUNK, make_batch, make_config
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch

from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphPolicy, SimpleGraphEncoder
from lib.policies.loading import CheckpointError, make_pi0_policy
from lib.policies.noise import seeded_noise_and_time
from lib.policies.sizes import REDUCED_SIZES, reduced_pi0_sizes


def model_inputs(policy, batch):
    images, img_masks = policy._preprocess_images(batch)
    return (
        images,
        img_masks,
        batch["observation.language.tokens"],
        batch["observation.language.attention_mask"],
        policy.prepare_state(batch),
    )


def test_encoder_shapes_and_gradients():
    encoder = SimpleGraphEncoder(num_nodes=10, node_dim=19, token_dim=32)
    nodes = torch.randn(3, 10, 19, requires_grad=True)
    tokens = encoder(nodes)
    assert tokens.shape == (3, 10, 32)
    tokens.square().mean().backward()
    assert nodes.grad is not None and nodes.grad.abs().sum() > 0
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Message passing mixes neighbours: changing node 0 changes node 1's token, not only node 0's.
    changed = nodes.detach().clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(encoder(changed)[:, 1], tokens[:, 1])


def test_encoder_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(batch, 10, 19\).*\(2, 10, 18\)"):
        SimpleGraphEncoder()(torch.randn(2, 10, 18))


def test_without_graph_equals_parent_pi0():
    torch.manual_seed(0)
    graph_policy = PI0GraphPolicy(make_config())
    with reduced_pi0_sizes("tiny"):
        parent = PI0Pytorch(graph_policy.config)
    missing, unexpected = parent.load_state_dict(graph_policy.model.state_dict(), strict=False)
    assert not missing and all(key.startswith("graph_encoder.") for key in unexpected)
    batch = make_batch()
    inputs = model_inputs(graph_policy, batch)
    actions = graph_policy.prepare_action(batch)
    noise, time = seeded_noise_and_time(parent, BATCH, seed=1, device="cpu")
    expected = parent(*inputs, actions, noise, time)
    assert torch.equal(graph_policy.model(*inputs, actions, noise, time, graph=None), expected)
    assert torch.equal(
        graph_policy.model.sample_actions(*inputs, noise=noise), parent.sample_actions(*inputs, noise=noise)
    )
    # ... and a graph changes the result: the tokens really reach the expert.
    with_graph = graph_policy.model(*inputs, actions, noise, time, graph=batch[GRAPH_KEY])
    assert not torch.allclose(with_graph, expected)


def test_graph_parameters_get_gradients():
    torch.manual_seed(0)
    policy = PI0GraphPolicy(make_config())
    loss, info = policy(make_batch())
    loss.backward()
    assert torch.isfinite(loss) and info["loss"] == loss.detach()
    for name, parameter in policy.model.graph_encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_padded_action_steps_do_not_count():
    torch.manual_seed(0)
    policy = PI0GraphPolicy(make_config())
    batch = make_batch()
    noise, time = seeded_noise_and_time(policy.model, BATCH, seed=3, device="cpu")
    batch["action_is_pad"] = torch.zeros(BATCH, CHUNK, dtype=torch.bool)
    batch["action_is_pad"][0, CHUNK // 2 :] = True  # frame 0 is near its episode's end, the others not
    loss, _ = policy(batch, noise=noise, time=time)
    per_element = policy.model(
        *model_inputs(policy, batch), policy.prepare_action(batch), noise, time, graph=batch[GRAPH_KEY]
    )
    # Only the real action dims (10 of 32) of the steps before the episode's end count, and each
    # frame weighs the same (its mean over its own valid steps).
    per_frame = torch.stack([per_element[0, : CHUNK // 2, :10].mean(), *per_element[1:, :, :10].mean(dim=(1, 2))])
    assert torch.allclose(loss, per_frame.mean())
    assert not torch.allclose(loss, per_element[:, :, :10][~batch["action_is_pad"]].mean())


def test_without_graph_use_graph_false_has_no_encoder():
    policy = PI0GraphPolicy(make_config(use_graph=False))
    assert policy.model.graph_encoder is None
    loss, _ = policy(make_batch())  # the graph in the batch is ignored
    assert torch.isfinite(loss)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_save_load_round_trip(tmp_path, size):
    torch.manual_seed(0)
    policy = make_pi0_policy(size, make_config(model_size=size), PI0GraphPolicy)
    vlm_width = policy.model.paligemma_with_expert.paligemma.config.text_config.hidden_size
    assert vlm_width == REDUCED_SIZES[size].vlm.width
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = PI0GraphPolicy.from_pretrained(tmp_path)
    assert loaded.config.model_size == size and loaded.config.use_graph
    original, reloaded = policy.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and any(k.startswith("model.graph_encoder.") for k in original)
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    batch = make_batch()
    inputs = model_inputs(policy, batch)
    noise, _ = seeded_noise_and_time(policy.model, BATCH, seed=5, device="cpu")
    expected = policy.model.sample_actions(*inputs, noise=noise, graph=batch[GRAPH_KEY])
    assert torch.equal(loaded.model.sample_actions(*inputs, noise=noise, graph=batch[GRAPH_KEY]), expected)
    # The loader also works through lib.policies.loading (reads the size from config.json).
    assert make_pi0_policy(tmp_path, policy_cls=PI0GraphPolicy).config.model_size == size


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="pretrained path nonexistent_model does not exist"):
        make_pi0_policy("nonexistent_model")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Checkpointing recomputes parts of embed_suffix in backward: the graph tokens must survive."""
    torch.manual_seed(0)
    plain = PI0GraphPolicy(make_config())
    checkpointed = PI0GraphPolicy(make_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch()
    noise, time = seeded_noise_and_time(plain.model, BATCH, seed=7, device="cpu")
    results = []
    for policy in (plain, checkpointed):
        policy.train()
        loss, _ = policy(batch, noise=noise, time=time)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert checkpointed.model.gradient_checkpointing_enabled
    assert torch.allclose(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert any(name.startswith("model.graph_encoder.") for name in grads_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name
