"""`scripts/train_soft_arm.py` end to end: real processes, real accelerate launch, real files."""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ACCELERATE, PYTHON, REPO, TWO_RANK_LAUNCH, metrics_rows, run
from safetensors.torch import load_file

from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.processors import load_pi0_processors, load_tokenizer

SCRIPT = "scripts/train_soft_arm.py"


def ranks_seen(output_dir: Path) -> set[str]:
    """The (rank, world size) each rank's log reports, e.g. {"0/2", "1/2"}."""
    seen = set()
    for log in output_dir.glob("train_rank*.log"):
        match = re.search(r"\[rank (\d+)\] processes: (\d+) ", log.read_text())
        if match:
            seen.add(f"{match.group(1)}/{match.group(2)}")
    return seen


@TWO_RANK_LAUNCH
def test_two_process_launch_checkpoint_loads(train_args, tmp_path):
    output_dir = tmp_path / "run"
    result = run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            "accelerate_configs/cpu_2proc.yaml",
            SCRIPT,
            *train_args,
            f"output_dir={output_dir}",
            "train.steps=4",
            "train.log_every=2",
            "train.val_every=2",
            "train.save_every=2",
        ]
    )
    assert ranks_seen(output_dir) == {"0/2", "1/2"}
    assert "final train loss" in result.stdout
    checkpoint = output_dir / "checkpoints" / "last" / "pretrained_model"
    assert checkpoint.resolve().parent.name == "step_00000004"
    assert [p.name for p in sorted((output_dir / "checkpoints").glob("step_*"))] == ["step_00000002", "step_00000004"]
    assert {row["step"] for row in metrics_rows(output_dir)} == {2, 4} and (output_dir / "loss.png").stat().st_size > 0

    policy = PI0GraphPolicy.from_pretrained(checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in policy.state_dict().items() if k in weights)
    assert any(k.startswith("model.graph_encoder.") for k in weights)
    preprocessor, postprocessor = load_pi0_processors(checkpoint, load_tokenizer(checkpoint))
    observation = {
        "observation.images.front": torch.rand(3, 224, 224),
        "observation.state": torch.zeros(10),
        "observation.graph": torch.zeros(10, 19),
        "task": "touch the red ball",
    }
    action = postprocessor(policy.select_action(preprocessor(observation)))
    assert action.shape == (1, 10) and torch.isfinite(action).all()


def test_resume_continues_to_the_same_loss_full_and_lora(train_args, tmp_path):
    common = [
        *train_args,
        "train.steps=6",
        "train.log_every=1",
        "train.val_every=3",
        "train.save_every=3",
        "train.keep_last=5",
        "data.num_workers=1",
    ]
    uninterrupted = tmp_path / "uninterrupted"
    run([PYTHON, SCRIPT, *common, f"output_dir={uninterrupted}"])
    # A second run starts from the uninterrupted run's mid-way checkpoint (step 3) and resumes.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    subprocess.run(
        ["cp", "-r", str(uninterrupted / "checkpoints/step_00000003"), str(resumed / "checkpoints")], check=True
    )
    result = run([PYTHON, SCRIPT, *common, f"output_dir={resumed}", "--resume", "latest"])
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    expected = {row["step"]: row["train/loss"] for row in metrics_rows(uninterrupted) if "train/loss" in row}
    got = {row["step"]: row["train/loss"] for row in metrics_rows(resumed) if "train/loss" in row}
    assert sorted(got) == [4, 5, 6]
    assert all(got[step] == expected[step] for step in (4, 5, 6)), (got, expected)
    final = "checkpoints/step_00000006/pretrained_model/model.safetensors"
    a, b = load_file(uninterrupted / final), load_file(resumed / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The weights are written once per checkpoint, in pretrained_model/; the training state
    # (optimizer, RNG, scheduler, progress) does not repeat them, and resuming loaded them from there.
    state = uninterrupted / "checkpoints/step_00000003/training_state"
    assert (state / "optimizer.bin").is_file() and not list(state.glob("model*.safetensors"))

    # LoRA (model.lora_rank) from that run's step-3 policy: only the adapters and the graph encoder
    # train; a resume from its step 2 (the base rebuilt, the adapters loaded back) is exact too, and
    # each checkpoint is a full policy (adapters merged) with the adapters beside it.
    lora = [*common, "train.steps=4", "train.save_every=2", "model.lora_rank=4"]
    lora += [f"model.pretrained={uninterrupted / 'checkpoints/step_00000003/pretrained_model'}"]
    result = run([PYTHON, SCRIPT, *lora, f"output_dir={tmp_path / 'lora'}"])
    assert re.search(r"parameters, 0\.0\d M trained", result.stdout), result.stdout
    resumed = tmp_path / "lora_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step_2 = tmp_path / "lora/checkpoints/step_00000002"
    subprocess.run(["cp", "-r", str(step_2), str(resumed / "checkpoints")], check=True)
    run([PYTHON, SCRIPT, *lora, f"output_dir={resumed}", "--resume", "latest"])
    expected = {row["step"]: row["train/loss"] for row in metrics_rows(tmp_path / "lora") if "train/loss" in row}
    got = {row["step"]: row["train/loss"] for row in metrics_rows(resumed) if "train/loss" in row}
    assert sorted(got) == [3, 4] and all(got[step] == expected[step] for step in (3, 4)), (got, expected)
    final = "checkpoints/step_00000004/pretrained_model"
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "lora" / final / name), load_file(resumed / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = PI0GraphPolicy.from_pretrained(resumed / final)  # a plain graph checkpoint
    assert not any(".lora_" in name for name, _ in merged.named_parameters())


def test_sigterm_saves_and_exits_zero(train_args, tmp_path):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(
        [PYTHON, SCRIPT, *train_args, f"output_dir={output_dir}", "train.steps=100000", "train.save_every=100000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = output_dir / "train_rank0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and re.search(r"step \d+ loss", log.read_text())):
        time.sleep(0.5)
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    match = re.search(r"stopped at step (\d+) after saving", log.read_text())
    assert match, output
    step = int(match.group(1))
    assert 10 <= step < 100000
    checkpoint = output_dir / "checkpoints" / f"step_{step:08d}"
    assert (checkpoint / "pretrained_model" / "model.safetensors").is_file()
    assert (output_dir / "checkpoints" / "last").resolve() == checkpoint.resolve()


LAUNCH_CONFIGS = {
    "cpu_2proc.yaml": [],
    "1gpu.yaml": [],
    "8gpu.yaml": ["--num_processes", "2"],
    "8gpu_fsdp.yaml": ["--num_processes", "2"],
    "2node_16gpu.yaml": ["--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1"],
}


# `make test` keeps the CPU config and one GPU config; the rest run under `make test-all`.
IN_MAKE_TEST = {"cpu_2proc.yaml", "8gpu.yaml"}


@TWO_RANK_LAUNCH
@pytest.mark.parametrize(
    "launch_config",
    [name if name in IN_MAKE_TEST else pytest.param(name, marks=pytest.mark.slow) for name in sorted(LAUNCH_CONFIGS)],
)
def test_dry_run_under_each_launch_config(launch_config, train_args, tmp_path):
    """The GPU configs are checked without a GPU: the launcher settings (process count scaled down
    to 2, mixed precision from the file) around one real step on the CPU."""
    result = run(
        [
            ACCELERATE,
            "launch",
            "--config_file",
            f"accelerate_configs/{launch_config}",
            *LAUNCH_CONFIGS[launch_config],
            SCRIPT,
            *train_args,
            f"output_dir={tmp_path}",
            "train.mixed_precision=null",
            "--dry_run",
        ]
    )
    processes = 1 if launch_config == "1gpu.yaml" else 2
    assert f"dry run ok: one step on {processes} process(es)" in result.stdout
    assert len(ranks_seen(tmp_path)) == processes
    expected_precision = "no" if launch_config == "cpu_2proc.yaml" else "bf16"
    assert f"mixed precision: {expected_precision}" in (tmp_path / "train_rank0.log").read_text()


def test_gradient_accumulation_equals_one_step_at_the_doubled_batch(train_args, tmp_path):
    """Two accumulated micro-batches of 4 (with gradient checkpointing) against one batch of 8: the
    sampler deals the same frames and each frame's noise is keyed by the frame, so the losses, the
    gradient norms and the weights after 2 steps agree to rounding. A broken accumulation (a loss
    not divided by the steps, gradients dropped between micro-steps) changes the gradient norm."""
    common = [*train_args, "train.steps=2", "train.log_every=1", "optim.warmup_steps=2", "train.save_every=2"]
    accumulated, doubled = tmp_path / "accumulated", tmp_path / "doubled"
    overrides = ["train.gradient_accumulation_steps=2", "model.gradient_checkpointing=true"]
    run([PYTHON, SCRIPT, *common, f"output_dir={accumulated}", *overrides])
    run([PYTHON, SCRIPT, *common, f"output_dir={doubled}", "data.batch_size=8"])

    rows = {run: [row for row in metrics_rows(run) if "train/loss" in row] for run in (accumulated, doubled)}
    assert [row["step"] for row in rows[accumulated]] == [1, 2]
    assert [row["train/lr"] for row in rows[accumulated]] == [pytest.approx(5e-4), pytest.approx(1e-3)]
    for key in ("train/loss", "train/grad_norm"):
        assert [row[key] for row in rows[accumulated]] == pytest.approx([row[key] for row in rows[doubled]], rel=1e-5)
    weights = [load_file(run / "checkpoints" / "last" / "pretrained_model" / "model.safetensors") for run in rows]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_trains_saves_and_loads(train_args, tmp_path):
    """`model.compile` (LeRobot's `compile_model`, torch.compile of pi0's forward and sampling): on a
    CPU this only shows that a compiled run trains, saves and loads."""
    overrides = ["train.steps=2", "train.log_every=1", "model.compile=true"]
    run([PYTHON, SCRIPT, *train_args, f"output_dir={tmp_path}", *overrides])
    rows = [row for row in metrics_rows(tmp_path) if "train/loss" in row]
    assert [row["step"] for row in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    policy = PI0GraphPolicy.from_pretrained(tmp_path / "checkpoints" / "last" / "pretrained_model")
    assert policy.config.compile_model and policy.config.compile_mode == "default"
