"""Pushing results to the Hugging Face hub: checked before the work that produces them (a run that
can never push fails at start, not after hours), done with huggingface_hub / LeRobot's own push."""

from __future__ import annotations

from pathlib import Path

from lib.run.errors import UserError


def check_hub_push(repo_id: str, flag: str) -> None:
    """A push to `repo_id` can be attempted: a valid repository id, the hub not switched off, a
    token. `flag` names the option in the message. Reachability is only known at push time."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"{flag}={repo_id}: not a hub repository id (expected 'owner/name')") from error
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag}={repo_id} needs the network, and HF_HUB_OFFLINE=1 is set; push later with `hf upload`")
    if huggingface_hub.get_token() is None:
        raise UserError(f"{flag}={repo_id}: no Hugging Face token; run `hf auth login` (or set HF_TOKEN) first")


def push_folder(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload a checkpoint directory (weights, config, processors, tokenizer) as a model repository;
    returns its URL."""
    import huggingface_hub
    import huggingface_hub.constants

    huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
    commit = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    return commit.repo_url.url
