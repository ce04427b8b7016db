"""Shared fixtures: the local tokenizer, a small converted soft-arm dataset and a 2-step graph
checkpoint trained on it, built once per session with the project's own scripts (real files, real
LeRobotDataset). What else the tests share (paths, running a command): tests/helpers.py."""

import os
from pathlib import Path

# Before the imports below: huggingface_hub reads HF_HUB_OFFLINE once, when helpers imports LeRobot.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
from helpers import PYTHON, run, train_tiny_graph_policy  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir, dataset_dir):
    """A 2-step graph policy on the session's small dataset (configs/soft_arm_sim.yaml): plumbing,
    not learning; evaluated, RL-trained and served by the tests."""
    return train_tiny_graph_policy(tmp_path_factory.mktemp("train"), tokenizer_dir, dataset_dir)
