"""Fine-tuning modes of a 3 B-parameter pi0 (config keys `model.train_expert_only`,
`model.freeze_vision_encoder`, LeRobot's own switches): the right parameters, and only those, get
gradients and reach the optimizer; the frozen part runs without autograd; save -> load keeps the
mode and the outputs."""

import pytest
import torch
from helpers import CHUNK, make_batch, make_config

from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.loading import make_pi0_policy
from lib.run.optim import make_optimizer
from lib.run.schemas import OptimConfig

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


def lora_actions(policy, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(2, CHUNK, 32, generator=torch.Generator().manual_seed(seed + 1))
    return policy.predict_action_chunk(make_batch(seed=seed), noise=noise)


def test_lora_trains_adapters_only_and_saves_merged_and_as_adapter(tmp_path):
    """`model.lora_rank`: only the adapters (on LeRobot's default pi0 targets) and the graph encoder
    get gradients; a checkpoint is a full policy with the adapters merged (any loader opens it) plus
    the adapters alone, which peft merges onto the base to the same policy and a resume loads back."""
    from accelerate import Accelerator
    from peft import PeftModel

    from lib.policies.loading import CheckpointError
    from lib.policies.lora import ADAPTER_DIR, add_lora_adapters, load_adapter_into
    from lib.run.checkpoint import save_policy_checkpoint

    torch.manual_seed(0)
    make_pi0_policy("tiny", make_config(), PI0GraphPolicy).save_pretrained(tmp_path / "base")
    lora = add_lora_adapters(PI0GraphPolicy.from_pretrained(tmp_path / "base"), rank=4)
    lora.train()
    optimizer = make_optimizer(lora, OptimConfig(lr=1e-2))
    for _ in range(2):  # the second step moves the adapters' A matrices too (B starts at zero)
        optimizer.zero_grad()
        lora(make_batch())[0].backward()
        optimizer.step()
    trained = {name for name, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(".lora_" in name or ".graph_encoder.modules_to_save." in name for name in trained)
    assert any(".gemma_expert." in name and ".lora_B." in name for name in trained)
    assert any(".graph_encoder." in name for name in trained)
    assert not any(p.requires_grad for name, p in lora.named_parameters() if ".base_layer." in name)
    lora.eval()
    expected = lora_actions(lora)

    checkpoint = save_policy_checkpoint(Accelerator(cpu=True), tmp_path / "run", 1, lora, extras=[])
    merged = PI0GraphPolicy.from_pretrained(checkpoint / "pretrained_model")  # a plain graph checkpoint
    torch.testing.assert_close(lora_actions(merged), expected, rtol=1e-5, atol=1e-5)
    adapter = checkpoint / "pretrained_model" / ADAPTER_DIR
    by_peft = PeftModel.from_pretrained(PI0GraphPolicy.from_pretrained(tmp_path / "base"), adapter).merge_and_unload()
    torch.testing.assert_close(lora_actions(by_peft), expected, rtol=1e-5, atol=1e-5)

    resumed = add_lora_adapters(PI0GraphPolicy.from_pretrained(tmp_path / "base"), rank=4)
    load_adapter_into(resumed, adapter)
    saved = dict(lora.named_parameters())
    assert all(torch.equal(p, saved[name]) for name, p in resumed.named_parameters())  # a resume is exact
    with pytest.raises(CheckpointError, match="does not match this LoRA model"):
        load_adapter_into(add_lora_adapters(PI0GraphPolicy.from_pretrained(tmp_path / "base"), rank=8), adapter)


@pytest.mark.parametrize("mode", sorted(FROZEN))
def test_ript_policy_takes_the_same_modes(mode, tokenizer_dir):
    """train_ript_pi0.py's `model` section has the same switches: they reach the flag-conditioned
    pi0, which freezes the same part; the optimality flag's embedding trains."""
    from lib.policies.factories import make_ript_policy
    from lib.run.schemas import ModelConfig

    model = ModelConfig(tokenizer=str(tokenizer_dir), chunk_size=4, image_size=32, **{mode: True})
    policy, *_ = make_ript_policy(model, "cpu")
    assert getattr(policy.config, mode)
    frozen = {name for name, p in policy.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in policy.named_parameters() if name.startswith(FROZEN[mode])}
    assert policy.model.condition_embedding.weight.requires_grad
