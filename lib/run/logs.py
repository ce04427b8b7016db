"""Per-rank log files, console logging on the main process, and tracker set-up."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from accelerate import Accelerator

LOG_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(message)s"


def init_trackers(
    accelerator: Accelerator,
    output_dir: str | Path,
    project: str,
    run_name: str,
    config: dict[str, Any],
    wandb_mode: str = "offline",
) -> None:
    """Start the trackers given to `Accelerator(log_with=...)`. The wandb run id is kept in
    `output_dir/wandb_run_id.txt`, so a resumed run continues the same wandb run."""
    init_kwargs: dict[str, Any] = {}
    if "wandb" in [getattr(tracker, "value", tracker) for tracker in accelerator.log_with]:
        id_file = Path(output_dir) / "wandb_run_id.txt"
        if accelerator.is_main_process and not id_file.exists():
            import wandb

            id_file.write_text(wandb.util.generate_id())
        accelerator.wait_for_everyone()
        init_kwargs["wandb"] = {
            "mode": wandb_mode,
            "name": run_name,
            "id": id_file.read_text().strip(),
            "resume": "allow",
            "dir": str(output_dir),
        }
    accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)


def append_metrics(path: str | Path, step: int, metrics: dict[str, float]) -> None:
    """One JSON line per logging event (kept across resumes)."""
    import json

    with open(path, "a") as file:
        file.write(json.dumps({"step": step, **metrics}) + "\n")


def plot_metrics(metrics_file: str | Path, png_file: str | Path, keys: tuple[str, ...], log_scale: bool = True) -> None:
    """A PNG of each of `keys` against the step, read from a metrics JSON-lines file."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = sorted({row["step"]: row[key] for row in rows if key in row}.items())
        if points:
            axis.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=key)
    axis.set_xlabel("step")
    if log_scale:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_file, dpi=100)
    plt.close(figure)


class TeeIO(io.TextIOBase):
    """A text stream that writes to a console stream (or nowhere) and a log file at once."""

    def __init__(self, console: TextIO | None, log_file: TextIO) -> None:
        super().__init__()
        self.console = console
        self.log_file = log_file

    def write(self, text: str) -> int:
        if self.console is not None:
            self.console.write(text)
        self.log_file.write(text)
        return len(text)

    def flush(self) -> None:
        if self.console is not None:
            self.console.flush()
        self.log_file.flush()

    def isatty(self) -> bool:
        return self.console is not None and self.console.isatty()


def tee_output(output_dir: str | Path, rank: int, is_main_process: bool) -> Path:
    """Everything this rank prints (stdout and stderr) also goes to `output_dir/train_rank{R}.log`;
    only the main process's stdout reaches the console (every rank's errors do)."""
    path = Path(output_dir) / f"train_rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stdout = TeeIO(sys.__stdout__ if is_main_process else None, log_file)
    sys.stderr = TeeIO(sys.__stderr__, log_file)
    return path


def setup_logging(output_dir: str | Path, rank: int, is_main_process: bool, name: str = "train") -> logging.Logger:
    """`tee_output`, plus a logger that stamps each line with the time and the rank: the one path
    to `output_dir/train_rank{R}.log` that every trainer takes (the RIPT scripts print plainly)."""
    tee_output(output_dir, rank, is_main_process)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stdout)  # the tee: the log file, and the console on rank 0
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    logger.addHandler(handler)
    return logger


def finish_run(accelerator: Accelerator) -> None:
    """An orderly end on every rank: wait for the others, free accelerate's references, end the
    trackers. The caller drops its own references to the model, optimizer and loaders first: on
    Python 3.12, gloo runs otherwise abort at exit now and then (docs/dependencies.md)."""
    import gc

    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
