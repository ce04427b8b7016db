"""Build or load a pi0 policy: a fresh size, or a pretrained path / hub id loaded checked (a missing,
truncated or mismatched weight is an error, never a silent random start)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from safetensors.torch import load_file as load_safetensors

from lib.policies.sizes import MODEL_SIZES, backbone_built_uninitialised, building_network, model_size_context
from lib.run.errors import UserError


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
    model_size: str | None = None,
) -> PI0Policy:
    """A policy of `policy_cls` with the weights of `source` (local path or hub id), checked.

    LeRobot's `PI0Policy.from_pretrained` prints load errors and returns the randomly initialised
    model; here every failure is a `CheckpointError`: a missing or truncated weights file, a
    checkpoint of another policy type, weights of another shape (model size, graph width), and
    missing or unexpected keys. Only the parts `policy_cls` adds to the saved policy type
    (`policy_cls.new_parts[saved type]`, e.g. the graph encoder over plain pi0) may be missing.
    `config` (an instance of `policy_cls.config_class`) replaces the saved config, as in LeRobot;
    `hub_kwargs` go to the hub download (`resolve_pretrained`). `model_size` is the size of a
    checkpoint whose config names none (LeRobot's own pi0 config, as `export_pi0.py` writes it:
    full unless given); a checkpoint that names its size keeps it.
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

    named = getattr(config, "model_size", None) or saved.get("model_size")
    if named is not None and model_size is not None and named != model_size:
        raise CheckpointError(f"{directory} holds a {named!r} policy, not {model_size!r}")
    size = named or model_size or "full"
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
