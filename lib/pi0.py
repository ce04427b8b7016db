"""Build or load a LeRobot pi0 policy: a pretrained path / hub id, or a fresh size (`tiny` for the
tests, `small` for the benchmarks, `full`).

LeRobot 0.6.1 takes no model sizes from `PI0Config` (only the variants `gemma_2b`/`gemma_300m`),
and the vision tower, projection and vocabulary sizes are hard-coded in
`PaliGemmaWithExpertModel.__init__`. The tiny and small models are therefore the real classes built
while `reduced_pi0_sizes()` swaps in their sizes; nothing of LeRobot's forward code is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import GemmaConfig, PI0Policy
from lerobot.policies.pi0.processor_pi0 import Pi0NewLineProcessor
from lerobot.processor import (
    PolicyProcessorPipeline,
    TokenizerProcessorStep,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
    policy_action_to_transition,
    transition_to_policy_action,
)
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME
from safetensors.torch import load_file as load_safetensors

from lib.errors import UserError
from lib.rollout import IMAGE_PREFIX, PolicyFn, PolicyOutput


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


class CheckpointError(UserError):
    """Weights or processors that cannot be loaded as asked: missing, truncated, of another model."""


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def resolve_pretrained(source: str | Path, hub_kwargs: dict[str, Any] | None = None) -> Path:
    """The local directory of a pretrained source: an existing directory, or a hub id fetched into
    (or found in) the Hugging Face cache (`hub_kwargs`: `snapshot_download`'s revision, cache_dir,
    token, force_download, local_files_only). Something that can only be a local path (it starts
    with '/', '.' or '~', has more than one '/', or its first folder exists here) must exist."""
    import huggingface_hub.constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") != 1 or path.parts[0] in os.listdir(".")
    if not looks_local:
        try:
            validate_repo_id(source)
        except HFValidationError:
            looks_local = True
    if looks_local:
        raise CheckpointError(f"pretrained path {source} does not exist (expected a checkpoint directory)")
    hub_kwargs = dict(hub_kwargs or {})
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        # Offline, a commit-hash revision would still list the repository online and fail.
        hub_kwargs["local_files_only"] = True
    try:
        return Path(snapshot_download(repo_id=source, **hub_kwargs))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise CheckpointError(
            f"hub id {source!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE=1' if huggingface_hub.constants.HF_HUB_OFFLINE else 'no network'}). "
            f"Fetch it once on a machine with network (`hf download {source}`, then copy ~/.cache/huggingface "
            "here, or `hf download --local-dir DIR` and pass DIR) and run with HF_HUB_OFFLINE=1"
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"hub id {source!r}: no such repository on the Hugging Face hub") from error


def saved_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, checked to exist and to be JSON."""
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; expected a checkpoint's pretrained_model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error})") from error


def load_pretrained_policy(
    source: str | Path,
    policy_cls: type[PI0Policy] = PI0Policy,
    config: PI0Config | None = None,
    hub_kwargs: dict[str, Any] | None = None,
) -> PI0Policy:
    """A policy of `policy_cls` with the weights of `source` (local path or hub id), checked.

    LeRobot's `PI0Policy.from_pretrained` prints load errors and returns the randomly initialised
    model; here every failure is a `CheckpointError`: a missing or truncated weights file, a
    checkpoint of another policy type, weights of another shape (model size, graph width), and
    missing or unexpected keys. Only the parts `policy_cls` adds to the saved policy type
    (`policy_cls.new_parts[saved type]`, e.g. the graph encoder over plain pi0) may be missing.
    `config` (an instance of `policy_cls.config_class`) replaces the saved config, as in LeRobot;
    `hub_kwargs` go to the hub download (`resolve_pretrained`).
    """
    directory = resolve_pretrained(source, hub_kwargs)
    saved = saved_config(directory)
    saved_type = saved.get("type")
    new_parts_by_type = getattr(policy_cls, "new_parts", {})
    loads_types = (policy_cls.name, *new_parts_by_type)
    if saved_type not in loads_types:
        raise CheckpointError(
            f"{directory} holds a {saved_type!r} policy; {policy_cls.__name__} loads {' or '.join(loads_types)}"
        )
    if config is None:
        config = PreTrainedConfig.from_pretrained(directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        state_dict = load_safetensors(weights_file)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{weights_file} is truncated or corrupt ({str(error).splitlines()[0]})") from error

    size = getattr(config, "model_size", None) or saved.get("model_size", "full")
    with model_size_context(size), backbone_built_uninitialised():
        policy = policy_cls(config)
    load_weights_into(policy, weights_file, state_dict, new_parts_by_type.get(saved_type, ()))
    policy.to(config.device)
    policy.eval()
    return policy


def load_weights_into(
    policy: PI0Policy,
    weights_file: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    new_parts: tuple[str, ...] = (),
) -> None:
    """Load a saved policy's weights (`state_dict`, read from `weights_file` when None) into
    `policy`, checked: shapes, and every key filled except those starting with `new_parts` and
    tied weights; else a `CheckpointError` naming `weights_file`."""
    if state_dict is None:
        try:
            state_dict = load_safetensors(weights_file)
        except Exception as error:  # safetensors raises its own error type for a damaged file
            raise CheckpointError(f"{weights_file} is truncated or corrupt ({str(error).splitlines()[0]})") from error
    state_dict = policy._fix_pytorch_state_dict_keys(state_dict, policy.config)  # LeRobot's openpi key renames
    state_dict = {key if key.startswith("model.") else f"model.{key}": value for key, value in state_dict.items()}
    name = type(policy).__name__
    try:
        missing, unexpected = policy.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches: another size or action dimension
        mismatches = [line.strip() for line in str(error).splitlines()[1:] if "size mismatch" in line]
        raise CheckpointError(
            f"{weights_file} does not fit a {getattr(policy.config, 'model_size', 'full')} {name} with this config "
            f"(another model size or action dimension?): {'; '.join(mismatches[:3])}"
        ) from error
    tied = _tied_to_loaded(policy, state_dict)
    missing = [key for key in missing if not key.startswith(new_parts) and key not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not match {name}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )


def _tied_to_loaded(module: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> set[str]:
    """Keys of `module` that share their storage with a loaded tensor (tied weights are saved once)."""
    tensors = module.state_dict(keep_vars=True)
    loaded_pointers = {tensors[key].data_ptr() for key in loaded if key in tensors}
    return {key for key, tensor in tensors.items() if key not in loaded and tensor.data_ptr() in loaded_pointers}


class CheckedLoadPolicy(PI0Policy):
    """Base of this project's pi0 policies: `from_pretrained` is `load_pretrained_policy` (load errors
    raise instead of leaving random weights), so LeRobot's own tools load them just as strictly.

    `new_parts`: for each other policy type it can start from, the state-dict prefixes it adds to
    that type (fresh when it starts from it). `network_cls`: the `PI0Pytorch` subclass it builds."""

    new_parts: dict[str, tuple[str, ...]] = {}
    network_cls: type[modeling_pi0.PI0Pytorch] = modeling_pi0.PI0Pytorch

    def __init__(self, config: PI0Config, **kwargs: Any) -> None:
        with building_network(self.network_cls, getattr(config, "model_size", "full")):
            super().__init__(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: PI0Config | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        strict: bool = True,
        **factory_kwargs: Any,
    ) -> PI0Policy:
        """LeRobot's signature. The hub arguments reach the download; loading is always strict
        (`strict=False` is refused rather than ignored); `factory_kwargs` are what LeRobot's
        `make_policy` also passes (`dataset_stats`, `dataset_meta`), which pi0 does not use: its
        normalization lives in the saved processors."""
        if not strict:
            raise CheckpointError(f"{cls.__name__}.from_pretrained loads strictly; strict=False is not supported")
        hub_kwargs = {
            "force_download": force_download,
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "revision": revision,
        }
        return load_pretrained_policy(pretrained_name_or_path, cls, config, hub_kwargs)


def make_pi0_policy(
    model: str | Path,
    config: PI0Config | None = None,
    policy_cls: type[PI0Policy] = PI0Policy,
) -> PI0Policy:
    """A pi0 policy from `model`: "tiny" or "small" (fresh, reduced sizes, random init), "full"
    (fresh, full-size, random init) or a pretrained local path / hub id such as `lerobot/pi0_base` (checked:
    `load_pretrained_policy`).

    `config` (an instance of `policy_cls.config_class`) sets features, chunk size, dtype, ...; with
    a pretrained model it replaces the saved config, as in LeRobot's `from_pretrained`.
    """
    model = str(model)
    if model in MODEL_SIZES:
        config = config if config is not None else policy_cls.config_class()
        with model_size_context(model):
            return policy_cls(config)
    return load_pretrained_policy(model, policy_cls, config)


def saved_model_size(source: str | Path) -> str:
    """The `model_size` a checkpoint was saved with ("full" for LeRobot's own configs)."""
    return saved_config(resolve_pretrained(source)).get("model_size", "full")


def make_optimizer(policy: torch.nn.Module, optim: Any) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `policy`, from an `optim` config section (lr, betas,
    eps, weight_decay); the fused kernel on a GPU."""
    return torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=torch.cuda.is_available(),
    )


def cosine_with_warmup(warmup_steps: int, total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine decay from 1 to `final_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def count_parameters(module: torch.nn.Module, trained_only: bool = False) -> int:
    """Parameters of `module`; with `trained_only`, those that require gradients."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained_only)


# --- Tokenizer and processors ------------------------------------------------------------------

_TOKENIZER_CORPUS = [
    "touch the red ball",
    "reach the red ball",
    "move the tip to the red ball",
    "touch the blue target",
    "bend the arm to the left",
    "bend the arm to the right",
    "curl the soft arm upward",
    "put the bowl on the plate",
    "open the top drawer of the cabinet",
    "pick up the black bowl",
    "put the cream cheese in the bowl",
    "turn on the stove",
    "put the wine bottle on top of the cabinet",
    "pick up the alphabet soup and place it in the basket",
    "push the plate to the front of the stove",
    "put both the alphabet soup and the tomato sauce in the basket",
    "stack the left bowl on the right bowl",
    "close the microwave",
    "put the mug on the plate",
    "pick up the book and place it in the back compartment",
]


def build_local_tokenizer(vocab_size: int = 500) -> Any:
    """A byte-level BPE tokenizer (transformers `PreTrainedTokenizerFast`) trained on a small
    built-in corpus of robot instructions; its ids stay below the tiny pi0 vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size >= TINY_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be < {TINY_VOCAB_SIZE} (the tiny pi0 vocab), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def load_tokenizer(name_or_path: str | Path) -> Any:
    """A transformers tokenizer from a local directory (e.g. `artifacts/tokenizer`) or hub id."""
    from transformers import AutoTokenizer

    if not Path(name_or_path).exists() and "/" not in str(name_or_path):
        raise CheckpointError(
            f"tokenizer {str(name_or_path)!r} not found; build it with "
            f"`python data_prep/make_tokenizer.py --output_dir {name_or_path}`"
        )
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as error:  # transformers' error for a missing local file or an uncached hub id
        raise CheckpointError(
            f"tokenizer {str(name_or_path)!r} could not be loaded ({str(error).splitlines()[0]}); a hub id must be "
            "in the Hugging Face cache when HF_HUB_OFFLINE=1 or there is no network"
        ) from error


def hub_tokenizer_id(tokenizer: Any) -> str | None:
    """The hub id a tokenizer was loaded from, or None for a local one."""
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    return source if source and not Path(source).expanduser().exists() else None


def make_pi0_processors(
    config: PI0Config, tokenizer: Any, dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """LeRobot's pi0 pre/post-processing pipelines with a tokenizer object instead of the
    hard-coded hub tokenizer (`make_pi0_pre_post_processors` minus the relative-action steps,
    which are off for pi0 by default). A tokenizer loaded from a hub id is given to the step by
    that id, which LeRobot saves with the pipeline, so its own `make_pre_post_processors` rebuilds
    it from a checkpoint; a local tokenizer (a path, not portable) is handed in as the object."""
    steps = make_default_policy_processor_steps(config, dataset_stats)
    tokenizer_name = hub_tokenizer_id(tokenizer)
    input_steps = [
        steps.rename_observations,
        steps.add_batch_dim,
        Pi0NewLineProcessor(),
        TokenizerProcessorStep(
            tokenizer=None if tokenizer_name else tokenizer,
            tokenizer_name=tokenizer_name,
            max_length=config.tokenizer_max_length,
            padding_side="right",
            padding="max_length",
        ),
        steps.to_device,
        steps.normalize,
    ]
    output_steps = [steps.unnormalize, steps.to_cpu]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=output_steps)


def load_pi0_processors(
    path: str | Path, tokenizer: Any, device: str | None = None
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """Reload the pipelines saved beside a checkpoint, handing them the tokenizer object (and,
    if given, the device batches should go to instead of the saved one)."""
    for name in (POLICY_PREPROCESSOR_DEFAULT_NAME, POLICY_POSTPROCESSOR_DEFAULT_NAME):
        if not (Path(path) / f"{name}.json").is_file():
            raise CheckpointError(
                f"{path} has no {name}.json: the normalization statistics and processing steps of its policy are "
                "unknown (a checkpoint saved by this project or LeRobot >= 0.4 has them)"
            )
    saved_steps = json.loads((Path(path) / f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json").read_text())["steps"]
    named = any(step.get("config", {}).get("tokenizer_name") for step in saved_steps)
    # A pipeline that names its hub tokenizer loads it by that name (and keeps the name when saved again).
    overrides: dict[str, Any] = {} if named else {"tokenizer_processor": {"tokenizer": tokenizer}}
    if device is not None:
        overrides["device_processor"] = {"device": device}
    preprocessor = PolicyProcessorPipeline.from_pretrained(
        str(path), config_filename=f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json", overrides=overrides
    )
    postprocessor = PolicyProcessorPipeline.from_pretrained(
        str(path),
        config_filename=f"{POLICY_POSTPROCESSOR_DEFAULT_NAME}.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    return preprocessor, postprocessor


def seeded_noise_and_time(
    model: modeling_pi0.PI0Pytorch, batch_size: int, seed: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise (B, chunk, max_action_dim) and time (B,) drawn with LeRobot's own
    samplers from a private RNG seeded by `seed`: a resumed run draws what the uninterrupted run
    drew, and two branches can share them. Drawn on the CPU so the result is device-independent."""
    config = model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = model.sample_noise((batch_size, config.chunk_size, config.max_action_dim), "cpu")
        time = model.sample_time(batch_size, "cpu")
    return noise.to(device), time.to(device)


def observations_to_batch(observations: list[dict[str, Any]]) -> dict[str, Any]:
    """Simulator observations -> a policy batch: `observation.images.*` (HWC uint8) become CHW
    float images in [0, 1], the other `observation.*` arrays are stacked, `task` is kept as a list;
    any other key (bookkeeping of the simulator) is left out."""
    batch: dict[str, Any] = {}
    for key in observations[0]:
        stacked = np.stack([o[key] for o in observations]) if key.startswith("observation.") else None
        if key.startswith(IMAGE_PREFIX):
            batch[key] = torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255.0
        elif stacked is not None:
            batch[key] = torch.from_numpy(stacked)
    batch["task"] = [o["task"] for o in observations]
    return batch


def make_policy_fn(
    policy: Any,
    preprocessor: Callable,
    postprocessor: Callable,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PolicyFn:
    """The simulators' view of a policy: observations in, unnormalized action chunks
    (n, chunk, action_dim) out, one batched `predict_action_chunk` for all of them; a
    `PolicyOutput` when the policy recorded how it sampled (`pop_sampling_record`)."""

    @torch.no_grad()
    def policy_fn(observations: list[dict[str, Any]]) -> np.ndarray | PolicyOutput:
        with autocast():
            chunks = policy.predict_action_chunk(preprocessor(observations_to_batch(observations)))
        actions = postprocessor(chunks.float()).numpy()
        record = policy.pop_sampling_record() if hasattr(policy, "pop_sampling_record") else None
        if record is None:
            return actions
        rows = {key: value.float().cpu().numpy() for key, value in record.items()}
        return PolicyOutput(actions, [{key: value[i] for key, value in rows.items()} for i in range(len(actions))])

    return policy_fn


def keyed_noise_and_time(
    model: modeling_pi0.PI0Pytorch, keys: Sequence[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise (B, chunk, max_action_dim) and time (B,), each sample's drawn with
    LeRobot's own samplers from a private RNG seeded by its own key (say, from the frame index and
    the epoch). A sample then gets the same noise whatever batch, micro-batch or rank it lands in:
    two accumulated micro-batches compute the loss of one step at their union, to rounding."""
    config = model.config
    noises, times = [], []
    with torch.random.fork_rng(devices=[]):
        for key in keys:
            torch.manual_seed(key)
            noises.append(model.sample_noise((1, config.chunk_size, config.max_action_dim), "cpu"))
            times.append(model.sample_time(1, "cpu"))
    return torch.cat(noises).to(device), torch.cat(times).to(device)


def load_policy_fn(checkpoint: str | Path, policy_for_type: dict[str, type[PI0Policy]]) -> PolicyFn:
    """A checkpoint's `pretrained_model` directory as the simulators' batched policy function
    (`make_policy_fn`), on the GPU in bf16 autocast when there is one.

    `policy_for_type` maps each saved policy type the caller evaluates to the class that runs it;
    a type mapped to a class of another type is loaded into it with the class's new parts fresh
    (only where they leave it acting unchanged, like a zero flag embedding). Any other checkpoint
    is a `CheckpointError` naming the directory."""
    checkpoint = resolve_pretrained(checkpoint)
    saved_type = saved_config(checkpoint).get("type")
    if saved_type not in policy_for_type:
        raise CheckpointError(
            f"{checkpoint} holds a {saved_type!r} policy; this evaluates {' or '.join(policy_for_type)} checkpoints"
        )
    policy_cls = policy_for_type[saved_type]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = PreTrainedConfig.from_pretrained(checkpoint)
    config = saved if isinstance(saved, policy_cls.config_class) else policy_cls.config_class.from_config(saved)
    config.device = device
    policy = load_pretrained_policy(checkpoint, policy_cls, config).eval()
    preprocessor, postprocessor = load_pi0_processors(checkpoint, load_tokenizer(checkpoint), device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    return make_policy_fn(policy, preprocessor, postprocessor, autocast)
