"""LoRA fine-tuning of pi0 through `peft`, on LeRobot's own default pi0 targets (`model.lora_rank`).

`add_lora_adapters` wraps a policy: its weights are frozen and low-rank adapters train on the
layers LeRobot's `PI0Policy._get_default_peft_targets` names (the action expert's q/v projections
and the state/action projections); the parts new on a base pi0 (a graph encoder, the RIPT
policy's optimality-flag embedding) train fully. A checkpoint
then holds both forms: `pretrained_model/` the adapters merged into a full policy (what every loader
and LeRobot tool opens, unchanged) and `pretrained_model/adapter/` the adapters alone in peft's
format, mergeable onto the base (`PeftModel.from_pretrained(base, dir).merge_and_unload()`). A
resume rebuilds the base from `model.pretrained` and loads the adapters back (`load_adapter_into`),
exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lib.policies.loading import CheckpointError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's name
# Modules that train in full beside the adapters, where present: new on a base pi0, they start
# untrained (the graph encoder) or at zero (the optimality flag's embedding of the RIPT policy).
FULLY_TRAINED = ("graph_encoder", "condition_embedding")


def is_lora_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a policy wrapped by `add_lora_adapters` (a `peft.PeftModel`)."""
    return hasattr(model, "peft_config")


def base_policy(model: torch.nn.Module) -> torch.nn.Module:
    """The LeRobot policy inside a LoRA-wrapped model (the model itself otherwise)."""
    return model.get_base_model() if is_lora_model(model) else model


def add_lora_adapters(policy: torch.nn.Module, rank: int) -> torch.nn.Module:
    """`policy` with LoRA adapters of rank `rank` (peft's default alpha, 8) on LeRobot's default
    pi0 targets; only the adapters and `FULLY_TRAINED` modules require gradients."""
    from peft import LoraConfig, get_peft_model

    # LeRobot defines pi0's targets only in this method (it builds the config from it in
    # `wrap_with_peft`, which also marks the policy's config as an adapter checkpoint; ours are full).
    targets = policy._get_default_peft_targets()["target_modules"]
    fully_trained = [name for name in FULLY_TRAINED if hasattr(policy.model, name)]
    return get_peft_model(policy, LoraConfig(r=rank, target_modules=targets, modules_to_save=fully_trained))


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base policy's state dict with every adapter folded into its layer (W + scale * B A) and
    the trained copies of the fully trained modules, computed out of place: training goes on with
    the adapters unmerged."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    # One delta at a time: at full size the deltas of every adapted layer together are 16 GB (fp32).
    lora_layers = {f"{name}.weight": module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue  # the adapters themselves; the untrained copy of a fully trained module
        key = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        if key in lora_layers:
            value = value + lora_layers[key].get_delta_weight(adapter).to(value.dtype)
        merged[key] = value
    return merged


def load_adapter_into(model: torch.nn.Module, directory: Path) -> None:
    """Load the adapters saved in `directory` into a LoRA-wrapped `model`, checked: every adapter
    (and fully trained module) of the model filled, nothing else; else a `CheckpointError`."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(
            f"{directory} has no {ADAPTER_WEIGHTS_FILE}: the checkpoint was not trained with LoRA (model.lora_rank)"
        )
    try:
        saved = load_file(weights_file)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{weights_file} is truncated or corrupt ({str(error).splitlines()[0]})") from error
    expected = get_peft_model_state_dict(model)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    mismatched = [key for key in expected.keys() & saved.keys() if expected[key].shape != saved[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{weights_file} does not match this LoRA model (another rank or base?): {len(missing)} missing "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, {len(mismatched)} of another shape "
            f"{mismatched[:2]}"
        )
    set_peft_model_state_dict(model, saved)
