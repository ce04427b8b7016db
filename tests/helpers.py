"""What the tests share besides fixtures (those are in conftest.py): paths, the interpreter and the
launcher, the two-rank launch group, running a project command or a script's `main`, and the tiny
policies' configs and batches."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature

from lib.policies.flag_pi0 import PI0CFGConfig
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphConfig

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


# The tiny graph / flag pi0 of the model tests, and a batch for them.
BATCH, CHUNK, IMAGE = 2, 16, 224


def make_config(chunk: int = CHUNK, image: int = IMAGE, model_size: str = "tiny", **overrides) -> PI0GraphConfig:
    features = {
        "observation.images.front": PolicyFeature(type=FeatureType.VISUAL, shape=(3, image, image)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(10,)),
        GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(10, 19)),
    }
    return PI0GraphConfig(
        model_size=model_size,
        chunk_size=chunk,
        n_action_steps=chunk,
        device="cpu",
        image_resolution=(image, image),
        input_features=features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(10,))},
        **overrides,
    )


def make_batch(seed: int = 0, size: int = BATCH, chunk: int = CHUNK, image: int = IMAGE) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "observation.images.front": torch.rand(size, 3, image, image, generator=generator),
        "observation.state": torch.randn(size, 10, generator=generator),
        GRAPH_KEY: torch.randn(size, 10, 19, generator=generator),
        "action": torch.randn(size, chunk, 10, generator=generator),
        "observation.language.tokens": torch.randint(0, 500, (size, 12), generator=generator),
        "observation.language.attention_mask": torch.ones(size, 12, dtype=torch.bool),
    }


def cfg_config(guidance_weight: float = 2.0) -> PI0CFGConfig:
    graph = make_config()
    features = {key: feature for key, feature in graph.input_features.items() if key != GRAPH_KEY}
    return PI0CFGConfig(
        model_size="tiny",
        chunk_size=graph.chunk_size,
        n_action_steps=graph.chunk_size,
        device="cpu",
        guidance_weight=guidance_weight,
        input_features=features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(10,))},
    )
