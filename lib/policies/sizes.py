"""The sizes a pi0 is built at: `full` (LeRobot's own), or the real classes shrunk (`tiny` for the
tests, `small` for the benchmarks), and the contexts that build a network at a size.

LeRobot 0.6.1 takes no model sizes from `PI0Config` (only the variants `gemma_2b`/`gemma_300m`),
and the vision tower, projection and vocabulary sizes are hard-coded in
`PaliGemmaWithExpertModel.__init__`. The tiny and small models are therefore the real classes built
while `reduced_pi0_sizes()` swaps in their sizes; nothing of LeRobot's forward code is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import GemmaConfig


@dataclasses.dataclass(frozen=True)
class ReducedPI0Sizes:
    """The sizes a reduced pi0 is built with. `num_heads` must stay 8: LeRobot hard-codes
    `8 * head_dim`; the VLM and the expert must share depth, head_dim and kv-heads."""

    vlm: GemmaConfig
    expert: GemmaConfig
    vision: dict[str, int]


TINY_VOCAB_SIZE = 512  # both reduced sizes: the local tokenizer's ids stay below it
REDUCED_SIZES = {
    # about 0.25 M parameters: the tests
    "tiny": ReducedPI0Sizes(
        vlm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    ),
    # about 6 M parameters, a step about 5x the tiny one on a CPU: the benchmarks' second size
    "small": ReducedPI0Sizes(
        vlm=GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32),
        expert=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32),
        vision={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
}
MODEL_SIZES = ("full", *REDUCED_SIZES)


@contextlib.contextmanager
def reduced_pi0_sizes(model_size: str) -> Iterator[None]:
    """While active, LeRobot's pi0 classes build with the sizes `REDUCED_SIZES[model_size]`."""
    sizes = REDUCED_SIZES[model_size]
    original_get_config = modeling_pi0.get_gemma_config
    original_vlm_cls = modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma
    original_expert_cls = modeling_pi0.PiGemmaForCausalLM

    def reduced_gemma_config(variant: str) -> GemmaConfig:
        original_get_config(variant)  # keeps LeRobot's own check of the variant name
        return sizes.vlm if variant == "gemma_2b" else sizes.expert

    def reduced_vlm(config: Any) -> Any:
        config._vocab_size = TINY_VOCAB_SIZE
        config.text_config.vocab_size = TINY_VOCAB_SIZE
        config.image_token_index = TINY_VOCAB_SIZE - 1
        for key, value in {**sizes.vision, "patch_size": 16}.items():
            setattr(config.vision_config, key, value)
        config.vision_config.projection_dim = config.text_config.hidden_size
        return original_vlm_cls(config=config)

    def reduced_expert(config: Any) -> Any:
        config.vocab_size = TINY_VOCAB_SIZE
        return original_expert_cls(config=config)

    modeling_pi0.get_gemma_config = reduced_gemma_config
    modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma = reduced_vlm
    modeling_pi0.PiGemmaForCausalLM = reduced_expert
    try:
        yield
    finally:
        modeling_pi0.get_gemma_config = original_get_config
        modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma = original_vlm_cls
        modeling_pi0.PiGemmaForCausalLM = original_expert_cls


def model_size_context(model_size: str) -> contextlib.AbstractContextManager:
    """The context a policy of `model_size` ("full", "small" or "tiny") must be built in."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")
    return contextlib.nullcontext() if model_size == "full" else reduced_pi0_sizes(model_size)


@dataclass
class SizedPI0Config(PI0Config):
    """`PI0Config` plus the size its network is built at ("full", "small" or "tiny"): saved in config.json,
    so `from_pretrained` rebuilds a tiny checkpoint at the tiny size."""

    model_size: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {self.model_size!r}")

    @classmethod
    def from_config(cls, config: PI0Config, **values: Any) -> SizedPI0Config:
        """This config class holding every setting of `config` (a plain pi0 or a sibling policy's
        config) that it has, plus `values`: e.g. a graph checkpoint's config with the flag added."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        saved = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name in names}
        return cls(**{**saved, **values})


@contextlib.contextmanager
def building_network(network_cls: type[modeling_pi0.PI0Pytorch], model_size: str) -> Iterator[None]:
    """While active, `PI0Policy.__init__` builds `network_cls` (a `PI0Pytorch` subclass) at
    `model_size`. It builds its network by the module-level name `PI0Pytorch`; swapping the name
    builds ours directly instead of building the parent's and replacing it (twice the memory at
    full size)."""
    original_network_cls = modeling_pi0.PI0Pytorch
    modeling_pi0.PI0Pytorch = network_cls
    try:
        with model_size_context(model_size):
            yield
    finally:
        modeling_pi0.PI0Pytorch = original_network_cls


@contextlib.contextmanager
def backbone_built_uninitialised() -> Iterator[None]:
    """While active, LeRobot's `PaliGemmaWithExpertModel` (the VLM and the action expert, 99.9 % of
    pi0) is built without random initialisation. For loading only: every one of its weights is then
    read from the checkpoint (`load_weights_into` refuses a missing one). At full size this cuts a load
    from about 3 minutes of CPU and 18.7 GB peak memory (fp32 random init, then the cast) to seconds and
    the weights' own size; non-persistent buffers (rotary frequencies) are computed, not initialised."""
    from transformers.initialization import no_init_weights

    original_backbone_cls = modeling_pi0.PaliGemmaWithExpertModel

    def uninitialised_backbone(*args: Any, **kwargs: Any) -> Any:
        with no_init_weights():
            return original_backbone_cls(*args, **kwargs)

    modeling_pi0.PaliGemmaWithExpertModel = uninitialised_backbone
    try:
        yield
    finally:
        modeling_pi0.PaliGemmaWithExpertModel = original_backbone_cls


def count_parameters(module: torch.nn.Module, trained_only: bool = False) -> int:
    """Parameters of `module`; with `trained_only`, those that require gradients."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained_only)
