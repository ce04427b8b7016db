"""Faults injected into real training processes; the files they leave are inspected."""

import os
import re
import resource
import signal
import subprocess
import time

import psutil
import pytest
import torch
from helpers import ACCELERATE, PYTHON, REPO, TWO_RANK_LAUNCH, metrics_rows, run
from safetensors.torch import load_file

from lib.run.faults import DISK_FULL_ENV, HOLD_SAVE_ENV, NONFINITE_LOSS_ENV, RAISE_AT_ENV, RAISE_IN_LOADER_ENV


def test_kill_9_while_a_checkpoint_is_written(train_args, tmp_path):
    """SIGKILL inside the write of step 4's checkpoint: step 2 and `last` stay valid, the half-written
    directory is never taken for a checkpoint, and `--resume latest` continues from step 2 to the end
    with no duplicate metrics rows."""
    output_dir = tmp_path / "run"
    command = [
        PYTHON,
        "scripts/train_soft_arm.py",
        *train_args,
        f"output_dir={output_dir}",
        "data.num_workers=0",
        "train.steps=4",
        "train.save_every=2",
        "train.log_every=1",
        "train.val_every=4",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, HOLD_SAVE_ENV: "4"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    holding = output_dir / "checkpoints" / ".tmp_step_00000004" / "HOLDING"
    deadline = time.monotonic() + 300
    while not holding.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holding.exists(), (
        f"the save of step 4 never started: {process.stderr.read()[-3000:] if process.poll() else ''}"
    )
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL

    checkpoints = output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp_step_00000004", "last", "step_00000002"]
    assert (checkpoints / "last").resolve().name == "step_00000002"
    assert (checkpoints / "last" / "pretrained_model" / "model.safetensors").is_file()

    result = run([*command, "--resume", "latest"])
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step_00000002", "step_00000004"]
    assert (checkpoints / "last").resolve().name == "step_00000004"
    rows = metrics_rows(output_dir)
    # the killed run's rows after step 2 were dropped on resume: each step is logged once
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4]

    # The disk runs out at the next save (here: a 200 kB file-size limit, which makes the weights'
    # write fail with EFBIG like ENOSPC would): one line, exit 2, step 4 still the last checkpoint,
    # no half-written directory left.
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    full = subprocess.run(
        [*command, "train.steps=6", "--resume", "latest"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "could not write the checkpoint of step 6" in full.stderr
    assert f"the last good checkpoint is {checkpoints / 'step_00000004'}" in full.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step_00000002", "step_00000004"]
    assert (checkpoints / "last").resolve().name == "step_00000004"


def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(train_args, tmp_path):
    """A NaN loss at steps 2, 4 and 5: each step is skipped (its weights equal the step before),
    counted in the metrics, and never reaches a checkpoint; the second in a row stops the run
    (train.max_nonfinite_steps=2) with one line, exit 2, the checkpoints kept."""
    output_dir = tmp_path / "run"
    result = run(
        [
            PYTHON,
            "scripts/train_soft_arm.py",
            *train_args,
            f"output_dir={output_dir}",
            "data.num_workers=0",
            "train.steps=6",
            "train.save_every=1",
            "train.keep_last=6",
            "train.log_every=1",
            "train.val_every=6",
            "train.max_nonfinite_steps=2",
        ],
        env={**os.environ, NONFINITE_LOSS_ENV: "2,4,5"},
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: 2 optimizer steps in a row, up to step 5, had a non-finite loss" in result.stderr
    assert "Traceback" not in result.stderr

    checkpoints = output_dir / "checkpoints"
    weights = {
        step: load_file(checkpoints / f"step_{step:08d}" / "pretrained_model" / "model.safetensors")
        for step in (1, 2, 3, 4)
    }
    assert not (checkpoints / "step_00000005").exists() and (checkpoints / "last").resolve().name == "step_00000004"
    assert all(torch.isfinite(tensor).all() for saved in weights.values() for tensor in saved.values())
    for skipped, before in ((2, 1), (4, 3)):
        assert all(torch.equal(weights[skipped][key], weights[before][key]) for key in weights[before])
    assert any(not torch.equal(weights[3][key], weights[2][key]) for key in weights[2])  # step 3 did update
    rows = metrics_rows(output_dir)
    assert [row["train/nonfinite_skipped"] for row in rows if "train/loss" in row] == [0, 1, 0, 1]


def two_rank_training(train_args: list[str], output_dir, steps: int, save_every: int) -> list[str]:
    """A 2-rank `accelerate launch` of train_soft_arm.py that logs every step."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        "accelerate_configs/cpu_2proc.yaml",
        "scripts/train_soft_arm.py",
        *train_args,
        f"output_dir={output_dir}",
        "data.num_workers=0",
        f"train.steps={steps}",
        f"train.save_every={save_every}",
        "train.log_every=1",
        f"train.val_every={steps}",
    ]


# Where rank 1 fails, and the steps logged before: at training step 4; in its data loader's worker
# process when it loads the first item of its 4th batch (4 items a batch: the worker loads ahead and
# torch raises its error when that batch is taken, which accelerate's loader does one batch early,
# as it reads ahead to know the last one, so before step 3); writing step 4's checkpoint.
FAULTS = {
    "update": ({RAISE_AT_ENV: "1:4"}, "fault injected on rank 1 at step 4", [1, 2, 3]),
    "loader": ({RAISE_IN_LOADER_ENV: "1:13"}, "fault injected in the data loader of rank 1 at item 13", [1, 2]),
    # every rank learns of the failed write and stops with the same line (exit 2)
    "disk full": (
        {DISK_FULL_ENV: "1:4"},
        "checkpoint of step 4 in {checkpoints} (rank 1: No space left on device); the last good checkpoint is",
        [1, 2, 3, 4],
    ),
}


@TWO_RANK_LAUNCH
@pytest.mark.parametrize(
    "place", ["update", *(pytest.param(place, marks=pytest.mark.slow) for place in ("loader", "disk full"))]
)
def test_one_rank_raising_ends_every_rank_and_keeps_the_checkpoint(train_args, tmp_path, place):
    """Rank 1 raises in a 2-rank launch (see FAULTS): rank 0 does not hang in the next collective
    (gloo reports the closed peer, the launcher stops the rest), the launch exits non-zero well
    within the subprocess timeout, no process of the run is left (loader workers included), and
    step 2's checkpoint is intact."""
    output_dir = tmp_path / "run"
    fault_env, message, steps_logged = FAULTS[place]
    result = run(
        [*two_rank_training(train_args, output_dir, steps=8, save_every=2), "data.num_workers=1"],
        env={**os.environ, **fault_env},
        check=False,
        timeout=240,  # a hang fails the test
    )
    assert result.returncode != 0
    assert message.format(checkpoints=output_dir / "checkpoints") in result.stdout + result.stderr
    left = [p for p in psutil.process_iter(["cmdline"]) if str(output_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left
    checkpoints = output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step_00000002"]
    assert (checkpoints / "last" / "pretrained_model" / "model.safetensors").is_file()
    rows = metrics_rows(output_dir)
    assert [row["step"] for row in rows] == steps_logged


@TWO_RANK_LAUNCH
@pytest.mark.slow
def test_one_ript_rank_raising_ends_every_rank_and_its_simulators(tokenizer_dir, tmp_path):
    """train_ript_pi0.py, 2 ranks on real LIBERO: rank 1 raises inside its rollout of iteration 2
    (at its first policy call, its simulators reset and waiting).
    Rank 0 does not hang in the next collective, the launch exits non-zero within the timeout, no
    process of the run is left (the LIBERO simulator workers included), iteration 1's checkpoint
    is intact."""
    output_dir = tmp_path / "run"
    command = [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "scripts/train_ript_pi0.py"]
    command += ["--config", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", f"output_dir={output_dir}"]
    command += ["train.iterations=3", "train.save_every=1", "tracking.report_to=[]"]
    marker = {"PI0_TEST_RUN": str(tmp_path)}  # inherited by every process of the run, simulators too
    result = run(command, env={**os.environ, RAISE_AT_ENV: "1:2", **marker}, check=False, timeout=300)
    assert result.returncode != 0
    assert (
        "fault injected on rank 1 at step 2"
        in result.stdout + result.stderr + (output_dir / "train_rank1.log").read_text()
    )

    def of_this_run(process: psutil.Process) -> bool:
        try:
            return process.environ().get("PI0_TEST_RUN") == str(tmp_path)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    deadline = time.monotonic() + 30  # simulators closing after their rank's exit
    while (left := [p for p in psutil.process_iter() if of_this_run(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [p.cmdline() for p in left]
    checkpoints = output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step_00000001"]
    assert (checkpoints / "last" / "pretrained_model" / "model.safetensors").is_file()


@TWO_RANK_LAUNCH
def test_sigterm_to_the_launcher_reaches_the_ranks_which_save(train_args, tmp_path):
    """SIGTERM to `accelerate launch` itself (what a cluster scheduler sends): torch's elastic agent
    forwards it to both ranks, which finish the step, save one checkpoint and exit 0; the launcher
    then reports the signal and exits non-zero (its own behaviour, docs/faults.md)."""
    output_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        two_rank_training(train_args, output_dir, steps=500, save_every=500),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while launcher.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "got signal: 15" in output
    stopped = [
        re.search(
            r"signal 15 received: stopped at step (\d+) after saving", (output_dir / f"train_rank{r}.log").read_text()
        )
        for r in (0, 1)
    ]
    assert all(stopped), output[-3000:]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step < 500
    assert (output_dir / "checkpoints" / "last").resolve().name == f"step_{step:08d}"
    assert (output_dir / "checkpoints" / "last" / "pretrained_model" / "model.safetensors").is_file()
