"""The policy an RL run trains, built from its `model` config section."""

from __future__ import annotations

from typing import Any

from lib.envs.libero.worker import (
    ACTION_DIM,
    AGENTVIEW_KEY,
    STATE_DIM,
    STATE_KEY,
    WRIST_KEY,
)


def libero_input_features(image_size: int) -> dict[str, Any]:
    """The LIBERO policy's inputs: two cameras at `image_size`, the 8-dim state."""
    from lerobot.configs import FeatureType, PolicyFeature

    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, image_size, image_size))
    return {
        AGENTVIEW_KEY: image,
        WRIST_KEY: image,
        STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
    }


def make_ript_policy(model: Any, device: str) -> tuple[Any, Any, Any, Any]:
    """The flag-conditioned pi0 for LIBERO (two cameras, 8-dim state, 7-dim actions) from the
    `model` section of a RIPT config, with its pre/post-processors and tokenizer.

    A pretrained source (local path or hub id, resolved through the Hugging Face cache) brings its
    own processors, with the normalization statistics it was trained with; one without them is
    refused. A fresh size ("tiny", "small", "full") gets identity normalization (there is no dataset to take
    statistics from). A plain pi0 checkpoint starts with a zero flag embedding."""
    # Imported here, not at the top: the simulator worker processes import this module and need
    # none of the model stack.
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.utils.constants import ACTION

    from lib.policies.flag_pi0 import PI0CFGConfig, PI0CFGPolicy
    from lib.policies.loading import make_pi0_policy, resolve_pretrained, saved_model_size
    from lib.policies.processors import load_pi0_processors, load_tokenizer, make_pi0_processors
    from lib.policies.sizes import MODEL_SIZES

    fresh = model.pretrained in MODEL_SIZES
    source = None if fresh else resolve_pretrained(model.pretrained)
    config = PI0CFGConfig(
        model_size=model.pretrained if fresh else saved_model_size(source),
        dtype=model.dtype,
        chunk_size=model.chunk_size,
        n_action_steps=model.chunk_size,
        num_inference_steps=model.num_inference_steps,
        image_resolution=(model.image_size, model.image_size),
        guidance_weight=model.guidance_weight,
        gradient_checkpointing=model.gradient_checkpointing,
        freeze_vision_encoder=model.freeze_vision_encoder,
        train_expert_only=model.train_expert_only,
        compile_model=model.compile,
        compile_mode=model.compile_mode,
        device=device,
        input_features=libero_input_features(model.image_size),
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    tokenizer = load_tokenizer(model.tokenizer)
    if fresh:
        config.normalization_mapping = {key: NormalizationMode.IDENTITY for key in ("VISUAL", "STATE", "ACTION")}
        policy = make_pi0_policy(model.pretrained, config, PI0CFGPolicy)
        preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer)
    else:
        preprocessor, postprocessor = load_pi0_processors(source, tokenizer, device)
        policy = make_pi0_policy(source, config, PI0CFGPolicy)
    return policy, preprocessor, postprocessor, tokenizer
