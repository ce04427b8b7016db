"""What keeps a run's saved state good: the non-finite loss guard and the graceful stop on a signal."""

from __future__ import annotations

import os
import signal

import torch
from accelerate import Accelerator

from lib.run.errors import UserError
from lib.run.faults import NONFINITE_LOSS_ENV


class NonFiniteError(UserError):
    """Too many optimizer steps in a row had a non-finite gradient."""


class NonFiniteGuard:
    """Optimizer steps whose gradient norm is not finite (a NaN or inf loss, an overflow) are
    skipped, so no NaN ever reaches the weights or a checkpoint; `max_in_a_row` skipped steps in a
    row stop the run with a `NonFiniteError` (the checkpoints already written stay as they are).

    The decision reads one scalar per optimizer step. It uses the norm of the gradients after
    they are reduced across ranks, so every rank decides the same."""

    def __init__(self, max_in_a_row: int, config_key: str = "train.max_nonfinite_steps") -> None:
        self.max_in_a_row = max_in_a_row
        self.config_key = config_key
        self.in_a_row = 0
        self.skipped = 0  # since the last `pop_skipped`
        self._poisoned_steps = {int(step) for step in os.environ.get(NONFINITE_LOSS_ENV, "").split(",") if step}

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """`loss`, or NaN at the steps a fault-injection test names."""
        return loss * float("nan") if step in self._poisoned_steps else loss

    def is_finite(self, grad_norm: torch.Tensor, step: int) -> bool:
        """Whether optimizer step `step` may apply its gradient."""
        if bool(torch.isfinite(grad_norm)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row, up to step {step}, had a non-finite loss or gradient "
                f"({self.config_key}={self.max_in_a_row}); each was skipped, so the weights and the "
                "checkpoints already written never saw them. Resume from the last checkpoint with a lower "
                "optim.lr, or check the data"
            )
        return False

    def pop_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


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

    def should_stop(self, accelerator: Accelerator, step: int = 0, every: int = 1) -> bool:
        """True on every rank once any rank got a signal (ranks must stop at the same step). With
        several ranks this is a collective and a host sync: asked only when `step % every == 0`
        (the same step on every rank), so a hot loop can check every `every` steps."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if step % every:
            return False
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
