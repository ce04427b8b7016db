"""Checkpoints: `output_dir/checkpoints/step_<N>/{pretrained_model,training_state}`.

`pretrained_model/` loads with `from_pretrained` (safetensors weights, config, processors,
tokenizer); `training_state/` is `accelerator.save_state` (optimizer, scheduler, RNG, registered
objects). A checkpoint is written under a temporary name and renamed when complete, `last` points
to the newest, and only the newest `keep_last` are kept: an interrupted save never corrupts or
replaces a good checkpoint.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "pretrained_model"
STATE_DIR = "training_state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    save_model: Callable[[Path], None],
    keep_last: int = 3,
) -> Path:
    """Save on every rank (all must call); `save_model(dir)` runs on the main process only."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted save of this same step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR))
    if accelerator.is_main_process:
        save_model(tmp / MODEL_DIR)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        link_tmp = root / ".last_tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(final.name)
        link_tmp.replace(root / "last")
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_policy_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, model: Any, extras: list[Any], keep_last: int = 3
) -> Path:
    """`save_checkpoint` of a (prepared) LeRobot policy: its weights are gathered on every rank (a
    collective under FSDP) and written as safetensors by `save_pretrained`, beside each of
    `extras` (processors, tokenizer: anything with `save_pretrained(directory)`)."""
    state_dict = accelerator.get_state_dict(model, unwrap=True)
    unwrapped = accelerator.unwrap_model(model)

    def save_model(directory: Path) -> None:
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        for extra in extras:
            extra.save_pretrained(directory)

    return save_checkpoint(accelerator, output_dir, step, save_model, keep_last)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`None` -> start fresh; "latest" -> newest checkpoint of `output_dir` (fresh if none);
    a path -> that checkpoint (must exist)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_DIR).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected {path / STATE_DIR})")
    return path


def step_of(checkpoint: Path) -> int:
    match = _STEP_DIR.match(checkpoint.resolve().name)
    if not match:
        raise ValueError(f"{checkpoint} is not a step_<N> checkpoint directory")
    return int(match.group(1))


class GracefulStop:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit 0; a second signal of the
    same kind gets the default action (the process ends at once)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.received: int | None = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def should_stop(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank got a signal (ranks must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
