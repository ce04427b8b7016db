"""Fine-tuning modes of a 3 B-parameter pi0 (config keys `model.train_expert_only`,
`model.freeze_vision_encoder`, LeRobot's own switches): the right parameters, and only those, get
gradients and reach the optimizer; the frozen part runs without autograd; save -> load keeps the
mode and the outputs."""

import pytest
import torch
from test_graph_pi0 import CHUNK, make_batch, make_config

from lib.graph_pi0 import PI0GraphPolicy
from lib.pi0 import make_optimizer, make_pi0_policy
from lib.schemas import OptimConfig

PALIGEMMA = "model.paligemma_with_expert.paligemma."
VISION_TOWER = PALIGEMMA + "model.vision_tower."
FROZEN = {"train_expert_only": PALIGEMMA, "freeze_vision_encoder": VISION_TOWER}


@pytest.mark.parametrize("mode", sorted(FROZEN))
def test_only_the_trained_part_gets_gradients_and_the_mode_survives_save_load(mode, tmp_path):
    torch.manual_seed(0)
    policy = make_pi0_policy("tiny", make_config(**{mode: True}), PI0GraphPolicy)
    policy.train()
    vision_outputs = []
    vision_tower = policy.model.paligemma_with_expert.paligemma.model.vision_tower
    vision_tower.register_forward_hook(lambda module, inputs, output: vision_outputs.append(output))
    loss, _ = policy(make_batch())
    loss.backward()

    frozen = FROZEN[mode]
    names = dict(policy.named_parameters())
    assert all(not p.requires_grad and p.grad is None for name, p in names.items() if name.startswith(frozen))
    trained = {name for name, p in names.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and not any(name.startswith(frozen) for name in trained)
    assert any(".gemma_expert." in name for name in trained) and any(".graph_encoder." in name for name in trained)
    if mode == "freeze_vision_encoder":  # the language model still learns (the suffix attends to it)
        assert any(".language_model." in name for name in trained)
    # the frozen vision tower is computed without autograd, and in eval mode
    assert vision_outputs and not vision_outputs[0].last_hidden_state.requires_grad and not vision_tower.training
    optimizer = make_optimizer(policy, OptimConfig())
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for p in policy.parameters() if p.requires_grad
    )

    policy.save_pretrained(tmp_path)
    loaded = PI0GraphPolicy.from_pretrained(tmp_path)
    assert getattr(loaded.config, mode)
    assert {name for name, p in loaded.named_parameters() if not p.requires_grad} == {
        name for name, p in names.items() if not p.requires_grad
    }
    batch = make_batch(seed=1)
    noise = torch.randn(2, CHUNK, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )
