"""The stage-by-stage RIPT reproduction: each stage script runs on real LIBERO with the tiny pi0."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ACCELERATE, PYTHON, REPO, TWO_RANK_LAUNCH, exit_in_process, metrics_rows, run
from safetensors.torch import load_file


def iterations_in(progress_file) -> list[dict]:
    return json.loads(progress_file.read_text())["iterations"]


def test_stage_08_hard_coded_config(tokenizer_dir, tmp_path):
    result = run(
        [
            PYTHON,
            "scripts/08_train_with_epochs.py",
            "--iterations",
            "1",
            "--tokenizer",
            str(tokenizer_dir),
            "--output_dir",
            str(tmp_path),
        ]
    )
    rows = iterations_in(tmp_path / "progress.json")
    assert [row["iteration"] for row in rows] == [1] and rows[0]["episodes"] == 2
    assert "iteration 1/1: success" in result.stdout


def test_stage_09_yaml_config_and_overrides(tokenizer_dir, tmp_path, monkeypatch, capsys):
    args = ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", f"output_dir={tmp_path}"]
    result = run([PYTHON, "scripts/09_train_with_config.py", *args, "train.iterations=1", "rl.rollouts_per_state=3"])
    assert "✓ config loaded from configs/minimal_test.yaml and validated" in result.stdout
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["config"]["rl"]["rollouts_per_state"] == 3
    assert [row["episodes"] for row in progress["iterations"]] == [3]  # one init state x K=3

    misspelt = "rl.rolouts_per_state=3"
    code, error = exit_in_process(monkeypatch, capsys, "scripts/09_train_with_config.py", *args, misspelt)
    assert code == 2 and "unknown config key 'rl.rolouts_per_state'" in error


def stage_10_command(launcher: list[str], tokenizer_dir, output_dir) -> list[str]:
    return [
        *launcher,
        "scripts/10_train_with_distributed.py",
        "--config_path",
        "configs/minimal_test.yaml",
        f"model.tokenizer={tokenizer_dir}",
        f"output_dir={output_dir}",
        "train.iterations=1",
    ]


@TWO_RANK_LAUNCH
def test_stage_10_two_processes_with_accelerate(tokenizer_dir, tmp_path):
    result = run(
        stage_10_command(
            [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"], tokenizer_dir, tmp_path
        )
    )
    assert "processes: 2 (DistributedType.MULTI_CPU)" in result.stdout
    assert result.stdout.count("iteration 1/1") == 1  # printed by the main process only
    rows = iterations_in(tmp_path / "progress.json")
    assert rows[0]["episodes"] == 4  # 2 ranks x 1 init state x K=2, summed across ranks


@TWO_RANK_LAUNCH
@pytest.mark.slow
def test_stage_10_two_processes_with_torchrun(tokenizer_dir, tmp_path):
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    result = run(stage_10_command([torchrun, "--nproc_per_node", "2"], tokenizer_dir, tmp_path))
    assert "processes: 2 (DistributedType.MULTI_CPU)" in result.stdout
    assert iterations_in(tmp_path / "progress.json")[0]["episodes"] == 4


@TWO_RANK_LAUNCH
def test_stage_11_logs_per_rank_and_trackers(tokenizer_dir, tmp_path):
    result = run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            "accelerate_configs/cpu_2proc.yaml",
            "scripts/11_train_with_logging.py",
            "--config_path",
            "configs/minimal_test.yaml",
            f"model.tokenizer={tokenizer_dir}",
            f"output_dir={tmp_path}",
            "train.iterations=1",
            "tracking.report_to=[tensorboard,wandb]",
        ]
    )
    assert result.stdout.count("iteration 1/1") == 1
    for rank in (0, 1):  # every rank's own output is in its log file
        assert "iteration 1/1: success" in (tmp_path / f"train_rank{rank}.log").read_text()
    metrics = metrics_rows(tmp_path)
    assert metrics[0]["step"] == 1 and metrics[0]["ript/episodes"] == 4
    assert (tmp_path / "success.png").stat().st_size > 0
    assert [p.name for p in (tmp_path / "videos").iterdir()] == ["iteration_00001_failure.mp4"]
    assert list((tmp_path / "pi0-ript").glob("events.out.tfevents.*"))  # tensorboard
    assert list((tmp_path / "wandb").glob("offline-run-*")) and (tmp_path / "wandb_run_id.txt").is_file()


@TWO_RANK_LAUNCH
def test_stage_12_dataset_sharded_by_accelerate(tokenizer_dir, tmp_path):
    result = run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            "accelerate_configs/cpu_2proc.yaml",
            "scripts/12_train_with_dataset.py",
            "--config_path",
            "configs/minimal_test.yaml",
            f"model.tokenizer={tokenizer_dir}",
            f"output_dir={tmp_path}",
            "train.iterations=1",
        ]
    )
    assert "50 init states, 25 batches per epoch and rank" in result.stdout
    assert iterations_in(tmp_path / "progress.json")[0]["episodes"] == 4


def test_stage_13_checkpoints_and_resumes(tokenizer_dir, tmp_path):
    """One process, in `make test`: a checkpoint with the training state each iteration, and
    `--resume latest` continues from it (the 2-rank signal run below is `slow`; train_ript_pi0.py's
    2-rank resume is tested exactly in test_train_ript.py)."""
    args = ["--config_path", "configs/minimal_test.yaml", "--output_dir", str(tmp_path)]
    args.append(f"model.tokenizer={tokenizer_dir}")
    run([PYTHON, "scripts/13_train_production_ready.py", *args, "train.iterations=1"])
    state = json.loads((tmp_path / "checkpoints/step_00000001/training_state/state.json").read_text())
    assert state["progress"] == {"iteration": 1, "draws_by_rank": [1]}
    result = run([PYTHON, "scripts/13_train_production_ready.py", *args, "train.iterations=2", "--resume", "latest"])
    assert "at iteration 1, init-state draw 1" in result.stdout and "iteration 2/2" in result.stdout
    assert [row["iteration"] for row in iterations_in(tmp_path / "progress.json")] == [1, 2]


@pytest.mark.slow
@TWO_RANK_LAUNCH
def test_stage_13_two_processes_sigint_and_resume(tokenizer_dir, tmp_path):
    """SIGINT to both ranks of an `accelerate launch`: they finish the iteration, save one
    checkpoint (with both ranks' RNG states) and exit 0, and so does the launcher; `--resume` under
    a new 2-process launch continues from it. (SIGINT to the launcher itself is forwarded to the
    ranks too, but it kills them after 30 s: scripts/STAGES.md.)"""
    launch = [
        ACCELERATE,
        "launch",
        "--config_file",
        "accelerate_configs/cpu_2proc.yaml",
        "scripts/13_train_production_ready.py",
        "--config_path",
        "configs/minimal_test.yaml",
        "--output_dir",
        str(tmp_path),
        f"model.tokenizer={tokenizer_dir}",
        "train.iterations=3",
    ]
    launcher = subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "train_rank0.log"
    deadline = time.time() + 400
    while time.time() < deadline and not (log.exists() and "iteration 1/3" in log.read_text()):
        time.sleep(0.5)
    ranks = [
        child
        for child in psutil.Process(launcher.pid).children(recursive=True)
        if "13_train_production_ready.py" in " ".join(child.cmdline())
    ]
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=400)
    assert launcher.returncode == 0, output
    stopped = {
        rank: re.search(r"stopped at iteration (\d+) after saving", (tmp_path / f"train_rank{rank}.log").read_text())
        for rank in (0, 1)
    }
    assert all(stopped.values()), output
    stopped_at = int(stopped[0].group(1))
    assert stopped_at == int(stopped[1].group(1)) < 3
    state = tmp_path / f"checkpoints/step_{stopped_at:08d}/training_state"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]

    result = run([*launch, "--resume", "latest"])
    assert "processes: 2 (DistributedType.MULTI_CPU)" in result.stdout
    assert f"at iteration {stopped_at}" in result.stdout and "iteration 3/3" in result.stdout
    iterations = iterations_in(tmp_path / "progress.json")
    assert [row["iteration"] for row in iterations] == [1, 2, 3]
    assert all(row["episodes"] == 4 for row in iterations)  # 2 ranks x K=2, gathered
    metrics = metrics_rows(tmp_path)
    assert all(row["ript/env_steps_per_s"] > 0 and row["ript/rss_gib"] > 0 for row in metrics)


@pytest.mark.slow
def test_stage_13_and_the_final_script_agree(tokenizer_dir, tmp_path):
    """Same config and seed: stage 13 and train_ript_pi0.py draw the same init states and measure
    the same rollouts over 2 iterations (the final script adds only evaluation)."""
    common = ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", "train.eval_every=100"]
    run([PYTHON, "scripts/13_train_production_ready.py", *common, f"output_dir={tmp_path / 'stage13'}"])
    run([PYTHON, "scripts/train_ript_pi0.py", *common, f"output_dir={tmp_path / 'final'}"])
    stage = metrics_rows(tmp_path / "stage13")
    final = metrics_rows(tmp_path / "final")
    measured = {"ript/rollout_time_s", "ript/update_time_s", "ript/env_steps_per_s", "ript/rss_gib"}
    assert len(stage) == len(final) == 2
    for ours, theirs in zip(stage, final, strict=True):
        same = {key: value for key, value in ours.items() if key not in measured}
        assert same == {key: theirs[key] for key in same}
        assert {"ript/advantage_mean", "ript/skipped_states"} <= theirs.keys() - ours.keys()
    a = load_file(tmp_path / "stage13/checkpoints/last/pretrained_model/model.safetensors")
    b = load_file(tmp_path / "final/checkpoints/last/pretrained_model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
