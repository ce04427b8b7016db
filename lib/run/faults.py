"""Fault injection for the reliability tests (docs/faults.md): environment
variables that make a run hold a save, fill the disk, raise, or see a non-finite loss at a step."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Fault-injection tests (tests/reliability): the save of this step stops half-written, before the
# rename, and waits there to be killed. Unset in every real run.
HOLD_SAVE_ENV = "PI0_FAULT_HOLD_SAVE_AT_STEP"


def hold_save_if_injected(tmp: Path, step: int) -> None:
    if os.environ.get(HOLD_SAVE_ENV) == str(step):
        (tmp / "HOLDING").touch()
        time.sleep(600)


def injected(variable: str, rank: int, at: int) -> bool:
    """Whether the fault-injection variable `variable` ("RANK:AT") names this rank and point."""
    return os.environ.get(variable) == f"{rank}:{at}"


# Fault-injection tests: "RANK:STEP" makes that rank's write of that step's checkpoint fail as on a
# full disk (ENOSPC). Unset in every real run.
DISK_FULL_ENV = "PI0_FAULT_DISK_FULL_AT"


def fill_disk_if_injected(rank: int, step: int) -> None:
    if injected(DISK_FULL_ENV, rank, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# Fault-injection tests (tests/reliability): the loss is made NaN at these optimizer steps
# (comma-separated). Unset in every real run.
NONFINITE_LOSS_ENV = "PI0_FAULT_NONFINITE_LOSS_AT_STEPS"


# Fault-injection tests: "RANK:STEP" makes that rank raise at that optimizer step. Unset in every
# real run.
RAISE_AT_ENV = "PI0_FAULT_RAISE_AT"


def raise_if_injected(rank: int, step: int) -> None:
    if injected(RAISE_AT_ENV, rank, step):
        raise RuntimeError(f"fault injected on rank {rank} at step {step}")


def raising_at_first_call_if_injected(function: Callable, rank: int, step: int) -> Callable:
    """`function`, or, where `RAISE_AT_ENV` names this rank and step, one that raises when first
    called: handed to a rollout as its policy, the rank fails mid-rollout, its simulators running."""
    if not injected(RAISE_AT_ENV, rank, step):
        return function

    def raising(*args: Any, **kwargs: Any) -> Any:
        raise_if_injected(rank, step)

    return raising


# Fault-injection tests: "RANK:N" makes the data loader of that rank (its worker process, if it
# has one) raise when it loads its N-th item; the rank is the launcher's RANK, which loader
# workers inherit. Unset in every real run.
RAISE_IN_LOADER_ENV = "PI0_FAULT_RAISE_IN_LOADER"


def raise_in_loader_if_injected(items_loaded: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if injected(RAISE_IN_LOADER_ENV, rank, items_loaded):
        raise RuntimeError(f"fault injected in the data loader of rank {rank} at item {items_loaded}")
