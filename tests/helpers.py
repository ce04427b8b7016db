"""What the tests share besides fixtures (those are in conftest.py): paths, the interpreter and the
launcher, the two-rank launch group, and running a project command or a script's `main`."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# `make test` runs the suite on 2 pytest-xdist workers (`--dist loadgroup`). Two-rank launches
# rendezvous on the launch config's fixed port, so they all go to one worker, one at a time.
TWO_RANK_LAUNCH = pytest.mark.xdist_group("two_rank_launch")


def run(command: list[str], cwd: Path = REPO, timeout: float = 600, check: bool = True, **kwargs):
    """Run a project command; on failure show its output."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def exit_in_process(monkeypatch, capsys, script: str, *args: str) -> tuple[int, str]:
    """Run `python <script> <args>` in this process and return its exit code and stderr. For a
    script's command-line error paths, which exit before anything is built: the same `main` and
    the same exit code, without a new interpreter's 6 s of imports."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def train_tiny_graph_policy(train_dir: Path, tokenizer_dir: Path, dataset_dir: Path, *overrides: str) -> Path:
    """A 2-step graph policy (configs/soft_arm_sim.yaml) on a test dataset: plumbing, not learning.
    Returns its last checkpoint's pretrained_model directory."""
    run(
        [
            PYTHON,
            "scripts/train_soft_arm.py",
            "--config",
            "configs/soft_arm_sim.yaml",
            f"output_dir={train_dir}",
            f"model.tokenizer={tokenizer_dir}",
            f"data.root={dataset_dir}",
            "data.batch_size=4",
            "data.val_fraction=0",
            "data.num_workers=0",
            "train.steps=2",
            "tracking.report_to=[]",
            *overrides,
        ]
    )
    return train_dir / "checkpoints" / "last" / "pretrained_model"


def fake_hub_tokenizer(tokenizer_dir: Path, hub_cache: Path, repo_id: str = "someone/tiny-tokenizer") -> Path:
    """A Hugging Face hub cache (use as HF_HUB_CACHE) holding the local tokenizer as `repo_id`, so
    code that loads a tokenizer by hub id runs offline."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tokenizer_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot / "config.json").write_text("{}")  # transformers' AutoTokenizer reads a hub repo's config first
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return hub_cache


def metrics_rows(output_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
