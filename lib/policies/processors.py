"""The tokenizer (a hub one, or the local one the project builds) and pi0's pre/post-processor
pipelines: made for a dataset, saved beside a checkpoint, loaded back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lerobot.policies.pi0.configuration_pi0 import PI0Config
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

from lib.policies.loading import CheckpointError
from lib.policies.sizes import TINY_VOCAB_SIZE

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
