"""Checkpoints: `output_dir/checkpoints/step_<N>/{pretrained_model,training_state}`.

`pretrained_model/` loads with `from_pretrained` (safetensors weights, config, processors,
tokenizer); `training_state/` is `accelerator.save_state` (optimizer, scheduler, RNG, registered
objects). A checkpoint is written under a temporary name and renamed when complete, `last` points
to the newest, and only the newest `keep_last` are kept: an interrupted save never corrupts or
replaces a good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from lib.run.errors import UserError
from lib.run.faults import fill_disk_if_injected, hold_save_if_injected

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
    error = None
    try:
        accelerator.save_state(str(tmp / STATE_DIR))  # (under FSDP it gathers across ranks first)
        fill_disk_if_injected(accelerator.process_index, step)
        if accelerator.is_main_process:
            save_model(tmp / MODEL_DIR)
            hold_save_if_injected(tmp, step)
    # A full disk, a file-size limit, lost permissions: the earlier checkpoints stand. torch.save's
    # zip writer reports a failed write as a RuntimeError ("iostream error"), the rest as OSError.
    except (OSError, RuntimeError) as caught:
        error = caught
    # Every rank learns whether every rank wrote its part (each writes its own RNG state), so all
    # stop with the same message instead of the others waiting for the failed one at a barrier.
    reason = (getattr(error, "strerror", None) or str(error).splitlines()[0]) if error else None
    failed = [(rank, why) for rank, why in enumerate(gather_object([reason])) if why]
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dirs(output_dir)
        reasons = "; ".join(f"rank {rank}: {why}" if accelerator.num_processes > 1 else why for rank, why in failed)
        raise UserError(
            f"could not write the checkpoint of step {step} in {root} ({reasons}); "
            + (f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved")
        ) from error
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


def write_weights_once(accelerator: Accelerator) -> None:
    """`save_state` leaves the model out of `training_state/`: its weights are already in
    `pretrained_model/model.safetensors` beside it (at full size a second copy is ~14 GB per
    checkpoint), and `load_state` loads them from there, checked (`lib.policies.loading.load_weights_into`); a
    LoRA model's adapters from `pretrained_model/adapter/` (`lib.policies.lora.load_adapter_into`).
    Call once after `prepare`. Under FSDP and DeepSpeed accelerate saves the model its own way
    and the hooks see no model."""
    from lib.policies.loading import WEIGHTS_FILE, load_weights_into
    from lib.policies.lora import ADAPTER_DIR, is_lora_model, load_adapter_into

    def leave_out_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def load_weights_from_pretrained_model(models: list, input_dir: str) -> None:
        pretrained_model = Path(input_dir).parent / MODEL_DIR
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            if is_lora_model(unwrapped):  # the base is rebuilt from model.pretrained; the adapters load
                load_adapter_into(unwrapped, pretrained_model / ADAPTER_DIR)
            else:
                load_weights_into(unwrapped, pretrained_model / WEIGHTS_FILE)
        models.clear()

    accelerator.register_save_state_pre_hook(leave_out_weights)
    accelerator.register_load_state_pre_hook(load_weights_from_pretrained_model)


JSON_STATE_FILE = "state.json"


class RunIdentity:
    """The config values that make a run what it is (say `rl.objective`), kept in its checkpoints:
    a resume that changes one of them is refused, naming the key (it would go on as another
    experiment under the same name). Register it with `checkpoint_as_json(..., identity=...)` and
    call `check(checkpoint)` before the output directory is touched."""

    optional_in_checkpoint = True  # checkpoints from before RunIdentity have none: nothing to compare

    def __init__(self, config: Any, keys: list[str]) -> None:
        from omegaconf import OmegaConf

        self.values = {key: OmegaConf.select(config, key) for key in keys}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for key, value in self.values.items():
            if key in saved and saved[key] != value:
                raise UserError(
                    f"the checkpoint was trained with {key}={saved[key]}, this run has {key}={value}: resume with "
                    f"{key}={saved[key]}, or start the other run in another output_dir"
                )

    def check(self, checkpoint: Path) -> None:
        """`load_state_dict` of what `checkpoint` saved (nothing to compare in older checkpoints)."""
        path = checkpoint / STATE_DIR / JSON_STATE_FILE
        saved = json.loads(path.read_text()).get("identity") if path.is_file() else None
        if saved is not None:
            self.load_state_dict(saved)


def checkpoint_as_json(accelerator: Accelerator, **objects: Any) -> None:
    """`accelerator.register_for_checkpointing` for objects whose state dict is plain data (step
    counters, the scheduler, the per-state outcome history), written to `training_state/state.json`
    by the main process: accelerate loads registered objects with unrestricted pickle
    (torch's loader with `weights_only` off), JSON runs no code. Every rank loads them on `load_state`;
    an entry missing from the file is an error unless its object sets `optional_in_checkpoint`."""

    def save(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            (Path(output_dir) / JSON_STATE_FILE).write_text(json.dumps(state))

    def load(models: list, input_dir: str) -> None:
        path = Path(input_dir) / JSON_STATE_FILE
        if not path.is_file():
            raise UserError(f"{input_dir} has no {JSON_STATE_FILE}: not a checkpoint of this version of the script")
        state = json.loads(path.read_text())
        for name, obj in objects.items():
            if name in state:
                obj.load_state_dict(state[name])
            elif not getattr(obj, "optional_in_checkpoint", False):  # an object may say older checkpoints lack it
                raise UserError(f"{path} has no '{name}': not a checkpoint of this version of the script")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_policy_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, model: Any, extras: list[Any], keep_last: int = 3
) -> Path:
    """`save_checkpoint` of a (prepared) LeRobot policy: its weights are gathered on every rank (a
    collective under FSDP) and written as safetensors by `save_pretrained`, beside each of
    `extras` (processors, tokenizer: anything with `save_pretrained(directory)`). A LoRA model
    (`lib.policies.lora`) is written merged into a full policy, with its adapters in `adapter/` beside."""
    from lib.policies.lora import ADAPTER_DIR, is_lora_model, merged_state_dict

    unwrapped = accelerator.unwrap_model(model)
    lora = unwrapped if is_lora_model(unwrapped) else None
    if lora is not None:
        state_dict, unwrapped = merged_state_dict(lora), lora.get_base_model()
    else:
        state_dict = accelerator.get_state_dict(model, unwrap=True)

    def save_model(directory: Path) -> None:
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        if lora is not None:
            lora.save_pretrained(directory / ADAPTER_DIR)
        for extra in extras:
            extra.save_pretrained(directory)

    return save_checkpoint(accelerator, output_dir, step, save_model, keep_last)


RUN_FILES = ("metrics.jsonl", "progress.json")  # what a run writes besides its checkpoints


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`None` -> start fresh; "latest" -> newest checkpoint of `output_dir` (fresh, said so, if
    there is none); a path -> that checkpoint (must exist)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            print(f"--resume latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}; starting a new run")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_DIR).is_dir():
        raise UserError(f"--resume {resume}: no checkpoint there (expected {path / STATE_DIR})")
    return path


def check_writable_dir(directory: str | Path, what: str = "output_dir") -> None:
    """A directory that exists or can be created, and can be written: checked before the work that
    fills it (read-only)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{what} {directory} exists and is not a directory")
    existing = directory if directory.exists() else next(p for p in directory.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {directory}: {existing} is not writable")


def check_output_dir(output_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Check `output_dir` before anything is written and return the checkpoint to resume (or None).

    It must be a writable directory (or creatable). One that already holds a run (checkpoints or a
    metrics file) is refused unless the run is resumed (`resume`) or `overwrite` is set: a fresh
    run would otherwise mix its checkpoints and metrics with the old ones. Read-only: every rank
    may call it; `start_output_dir` does the writing."""
    output_dir = Path(output_dir)
    check_writable_dir(output_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    holds_run = bool(checkpoint_dirs(output_dir)) or any((output_dir / name).exists() for name in RUN_FILES)
    if holds_run and not resume and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run; pass --resume latest to continue it, "
            "--overwrite to replace it, or another output_dir"
        )
    return resolve_resume(output_dir, resume)


def start_output_dir(output_dir: str | Path, checkpoint: Path | None, overwrite: bool) -> None:
    """Main process, after `check_output_dir`: create `output_dir`; with `overwrite` remove the old
    run's checkpoints and files; when resuming, drop the metrics rows written after `checkpoint`
    (an interrupted run logged steps that the resumed run will log again)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
        for name in RUN_FILES:
            (output_dir / name).unlink(missing_ok=True)
    metrics_file = output_dir / "metrics.jsonl"
    if metrics_file.exists():
        resumed_step = step_of(checkpoint) if checkpoint is not None else 0
        rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= resumed_step]
        if len(kept) != len(rows):
            atomic_write_text(metrics_file, "".join(line + "\n" for line in kept))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it over `path` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def step_of(checkpoint: Path) -> int:
    match = _STEP_DIR.match(checkpoint.resolve().name)
    if not match:
        raise ValueError(f"{checkpoint} is not a step_<N> checkpoint directory")
    return int(match.group(1))
