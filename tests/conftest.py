"""Shared fixtures: the local tokenizer and a small converted soft-arm dataset, built once per
session with the project's own data_prep scripts (real files, real LeRobotDataset)."""

import os
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

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")


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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    run([PYTHON, "data_prep/make_tokenizer.py", "--output_dir", str(path)])
    return path


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("soft_arm_raw")
    run(
        [
            PYTHON,
            "data_prep/make_fake_soft_arm.py",
            "--output_dir",
            str(path),
            "--episodes",
            "6",
            "--length",
            "24",
            "--image_size",
            "64",
        ]
    )
    return path


@pytest.fixture(scope="session")
def dataset_dir(raw_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("soft_arm_lerobot") / "dataset"
    run([PYTHON, "data_prep/soft_arm_to_lerobot.py", "--raw_dir", str(raw_dir), "--output_dir", str(path)])
    return path


@pytest.fixture(scope="session")
def train_args(tokenizer_dir, dataset_dir) -> list[str]:
    """Overrides that point configs/debug_config.yaml at the session's data, small and quiet."""
    return [
        "--config",
        "configs/debug_config.yaml",
        f"model.tokenizer={tokenizer_dir}",
        f"data.root={dataset_dir}",
        "data.batch_size=4",
        "data.val_fraction=0.34",
        "train.val_batches=2",
        "tracking.report_to=[]",
    ]


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
