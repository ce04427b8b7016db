"""`scripts/train_ript_pi0.py` on real LIBERO with the tiny pi0 (configs/minimal_test.yaml)."""

import json
import re
import signal
import subprocess
import time

import pytest
import torch
from helpers import ACCELERATE, PYTHON, REPO, TWO_RANK_LAUNCH, exit_in_process, metrics_rows, run
from safetensors.torch import load_file

from lib.envs.libero.worker import AGENTVIEW_KEY, WRIST_KEY
from lib.policies.flag_pi0 import PI0CFGPolicy
from lib.policies.processors import load_pi0_processors, load_tokenizer
from lib.rl.iteration import MEASURED_KEYS, OPTIONAL_KEYS, RECORD_KEYS

SCRIPT = "scripts/train_ript_pi0.py"


@pytest.fixture()
def args(tokenizer_dir, tmp_path):
    return ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", f"output_dir={tmp_path}"]


# What a re-run measures differently (wall time, memory); everything else must repeat exactly.
MEASURED = {f"ript/{key}" for key in MEASURED_KEYS}


@pytest.mark.slow  # 130 s; CI runs the slow suite after make test (.ci/run)
@TWO_RANK_LAUNCH
def test_two_process_launch_and_bit_exact_resume(args, tmp_path):
    """2 ranks, 2 iterations; then resumed from iteration 1's checkpoint in the same output_dir:
    iteration 2 repeats exactly, each rank at its own sampler position, and metrics.jsonl holds each
    iteration once. At this size no rollout succeeds and nothing is updated, so what must repeat is
    what the restored RNG and sampler decide: the init states drawn (in the outcome history), the
    actions taken (the video's frames), the statistics and the weights."""
    launch = [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", SCRIPT, *args]
    run(launch)
    logs = sorted(p.name for p in tmp_path.glob("train_rank*.log"))
    assert logs == ["train_rank0.log", "train_rank1.log"]
    for log in logs:
        assert "processes: 2 (DistributedType.MULTI_CPU)" in (tmp_path / log).read_text()
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["ript/episodes"] == 4 for row in rows)  # 2 ranks x K=2, gathered
    assert all(0 < row["ript/inference_time_s"] < row["ript/rollout_time_s"] for row in rows)  # the policy's share
    step_1, step_2 = (tmp_path / "checkpoints" / f"step_0000000{i}" for i in (1, 2))
    state = json.loads((step_1 / "training_state" / "state.json").read_text())["progress"]
    assert state == {"iteration": 1, "draws_by_rank": [1, 1]}  # one draw per rank and iteration
    weights = load_file(step_2 / "pretrained_model" / "model.safetensors")
    saved_state = (step_2 / "training_state" / "state.json").read_text()
    video = (tmp_path / "videos" / "iteration_00002_failure.mp4").read_bytes()

    run([*launch, "--resume", str(step_1)])
    for rank in (0, 1):
        log = (tmp_path / f"train_rank{rank}.log").read_text()
        assert f"resumed from {step_1} at iteration 1, init-state draw 1" in log
    again = metrics_rows(tmp_path)
    assert [row["step"] for row in again] == [1, 2]  # iteration 2's first row was dropped
    assert again[0] == rows[0]
    assert {k: v for k, v in again[1].items() if k not in MEASURED} == {
        k: v for k, v in rows[1].items() if k not in MEASURED
    }
    assert (step_2 / "training_state" / "state.json").read_text() == saved_state
    assert (tmp_path / "videos" / "iteration_00002_failure.mp4").read_bytes() == video
    resumed = load_file(step_2 / "pretrained_model" / "model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_stop_resume_and_what_a_run_writes(args, tmp_path):
    """SIGTERM mid-run saves and exits 0; `--resume` continues; then the whole run's metrics,
    evaluation, plot, videos and loadable checkpoint. (A dry run in a finished run's output_dir:
    the slow compiled-model test.)"""
    process = subprocess.Popen(
        [PYTHON, SCRIPT, *args, "train.iterations=3", "optim.warmup_iterations=2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = tmp_path / "train_rank0.log"
    deadline = time.time() + 400
    while time.time() < deadline and not (log.exists() and "iteration 1/3" in log.read_text()):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output
    stopped = re.search(r"stopped at iteration (\d+) after saving", log.read_text())
    assert stopped, output
    stopped_at = int(stopped.group(1))
    assert stopped_at < 3 and (tmp_path / f"checkpoints/step_{stopped_at:08d}/training_state").is_dir()

    result = run([PYTHON, SCRIPT, *args, "train.iterations=3", "optim.warmup_iterations=2", "--resume", "latest"])
    assert f"at iteration {stopped_at}" in result.stdout
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["ript/lr"] for row in rows] == pytest.approx([5e-5, 1e-4, 1e-4])  # a function of the iteration
    for row in rows:
        assert row["ript/episodes"] == 2 and 0.0 <= row["ript/success_rate"] <= 1.0
        assert row["ript/groups_kept"] + row["ript/dropped_all_success"] + row["ript/dropped_all_failure"] == 1
        assert row["ript/env_steps_per_s"] > 0 and row["ript/skipped_states"] == 0
        # a kept group of K=2 has advantages +1/-1: mean 0, std 1, half positive; none kept: zeros
        kept = row["ript/groups_kept"]
        assert row["ript/advantage_positive_fraction"] == (0.5 if kept else 0.0)
        assert row["ript/advantage_mean"] == 0.0 and row["ript/advantage_std"] == (1.0 if kept else 0.0)
    # The engine's record (lib/rl/iteration.py), as ript_soft_arm.py logs it too; the loss and the
    # objective's terms only once an update ran (none at this size, where no rollout succeeds), the
    # critic's figures only with rl.advantage=critic
    row = rows[-1]
    optional = {
        *(f"ript/{key}" for key in OPTIONAL_KEYS),
        *(key for key in row if key.startswith("ript/update_") and key != "ript/update_steps"),
    }
    engine_keys = {f"ript/{key}" for key in RECORD_KEYS}
    assert set(row) - optional == {"step", *engine_keys - optional, "ript/eval_success_rate"}
    # evaluation every 2 iterations (configs/minimal_test.yaml) and at the last one
    assert ["ript/eval_success_rate" in row for row in rows] == [False, True, True]
    assert "evaluation: success" in result.stdout
    assert (tmp_path / "success.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [
        f"iteration_0000{i}_failure.mp4" for i in (1, 2, 3)
    ]
    checkpoint = tmp_path / "checkpoints" / "last" / "pretrained_model"
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'step_00000003' / 'pretrained_model'}" in result.stdout
    policy = PI0CFGPolicy.from_pretrained(checkpoint)
    assert policy.config.model_size == "tiny" and policy.config.chunk_size == 4
    load_pi0_processors(checkpoint, load_tokenizer(checkpoint))


@pytest.mark.slow
def test_compiled_model_runs_an_iteration_and_saves(args, tmp_path):
    """`model.compile` (LeRobot's compile_model: torch.compile of the flag-conditioned pi0's forward
    and sampling): on a CPU this only shows that a compiled RIPT iteration runs, saves and loads.
    Then a dry run in the finished run's output_dir: one iteration, the run's files untouched."""
    run([PYTHON, SCRIPT, *args, "train.iterations=1", "model.compile=true"])
    assert [row["step"] for row in metrics_rows(tmp_path)] == [1]
    policy = PI0CFGPolicy.from_pretrained(tmp_path / "checkpoints" / "last" / "pretrained_model")
    assert policy.config.compile_model and policy.config.compile_mode == "default"

    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".log")}
    dry = run([PYTHON, SCRIPT, *args, "--dry_run"])
    assert "dry run ok: one iteration on 1 process(es), 2 episodes" in dry.stdout
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".log")}
    assert after == written


@pytest.mark.slow
def test_lora_run_saves_merged_and_adapters_and_resumes(tokenizer_dir, tmp_path):
    """`model.lora_rank` on LIBERO: from a pretrained checkpoint (here the tiny model after one
    iteration) a LoRA run trains only the adapters and the flag embedding, writes the merged policy
    (a plain pi0_cfg checkpoint) and its adapters, and resumes by loading the adapters back. What
    an update moves is checked in test_ript_engine.py (the tiny policy rarely succeeds in LIBERO's
    6 steps here, so an iteration may keep no group to update on)."""
    from lib.policies.lora import ADAPTER_DIR

    base_dir, lora_dir = tmp_path / "base", tmp_path / "lora"
    common = ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}"]
    run([PYTHON, SCRIPT, *common, f"output_dir={base_dir}", "train.iterations=1"])
    base = base_dir / "checkpoints" / "last" / "pretrained_model"
    lora = [*common, f"output_dir={lora_dir}", f"model.pretrained={base}", "model.lora_rank=4"]
    first = run([PYTHON, SCRIPT, *lora, "train.iterations=1"])
    parameters, trained = map(int, re.search(r"(\d+) parameters, (\d+) trained", first.stdout).groups())
    assert 0 < trained < parameters / 5
    result = run([PYTHON, SCRIPT, *lora, "train.iterations=2", "--resume", "latest"])
    assert "resumed from" in result.stdout
    assert [row["step"] for row in metrics_rows(lora_dir)] == [1, 2]
    checkpoint = lora_dir / "checkpoints" / "last" / "pretrained_model"
    assert (checkpoint / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    before, after = load_file(base / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert before.keys() == after.keys()
    # only the flag embedding and the weights under LeRobot's pi0 LoRA targets (adapters merged) move
    targets = re.compile(
        r"model\.(condition_embedding|(state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out)"
        r"|paligemma_with_expert\.gemma_expert\..*\.self_attn\.[qv]_proj)\.weight"
    )
    assert all(targets.fullmatch(key) for key in before if not torch.equal(before[key], after[key]))


def test_eval_libero_writes_summary_plot_and_video(tokenizer_dir, tmp_path, monkeypatch, capsys):
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature

    from lib.policies.flag_pi0 import PI0CFGConfig
    from lib.policies.processors import make_pi0_processors

    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64))
    config = PI0CFGConfig(
        model_size="tiny",
        chunk_size=4,
        n_action_steps=4,
        num_inference_steps=2,
        image_resolution=(64, 64),
        device="cpu",
        normalization_mapping={k: NormalizationMode.IDENTITY for k in ("VISUAL", "STATE", "ACTION")},
        input_features={
            AGENTVIEW_KEY: image,
            WRIST_KEY: image,
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
    )
    checkpoint = tmp_path / "checkpoint"
    PI0CFGPolicy(config).save_pretrained(checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir)
    for pipeline in make_pi0_processors(config, tokenizer):
        pipeline.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    output = tmp_path / "eval"
    result = run(
        [
            PYTHON,
            "scripts/eval_libero.py",
            "--checkpoint",
            str(checkpoint),
            "--task_names",
            "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
            "--num_init_states",
            "2",
            "--num_envs",
            "2",
            "--camera_size",
            "64",
            "--max_steps",
            "6",
            "--replan_steps",
            "3",
            "--settle_steps",  # plumbing, not the protocol: one settle step per reset
            "1",
            "--videos_per_task",
            "1",
            "--output_dir",
            str(output),
        ]
    )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["tasks"][0]["episodes"] == 2
    assert summary["tasks"][0]["mean_length"] == 6 and summary["overall_success_rate"] == 0.0
    assert "overall 0.0% over 2 episodes" in result.stdout
    assert (output / "success_per_task.png").stat().st_size > 0
    assert [p.name for p in (output / "videos").iterdir()] == ["task0_init0_failure.mp4"]

    code, error = exit_in_process(monkeypatch, capsys, "scripts/eval_libero.py", f"--checkpoint={tmp_path / 'nowhere'}")
    assert code == 2 and f"pretrained path {tmp_path / 'nowhere'} does not exist" in error
    assert "Traceback" not in error
    (tmp_path / "empty").mkdir()
    code, error = exit_in_process(monkeypatch, capsys, "scripts/eval_libero.py", f"--checkpoint={tmp_path / 'empty'}")
    assert code == 2 and "has no config.json" in error


@TWO_RANK_LAUNCH
@pytest.mark.slow
def test_fsdp_launch_is_refused_at_start(args, tmp_path):
    """RIPT under FSDP: each rank's rollouts need the full policy, so the launch stops at once with
    one line on every rank (exit 2 there), before output_dir is written: never a hang mid-run."""
    launch = [ACCELERATE, "launch", "--config_file", "accelerate_configs/8gpu_fsdp.yaml", "--num_processes", "2"]
    result = run([*launch, SCRIPT, *args, "train.mixed_precision=null"], check=False, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: train_ript_pi0.py does not run under FSDP") == 2, result.stderr[-2000:]
    assert "Traceback (most recent call last)" not in result.stderr.split("error: train_ript_pi0.py")[0]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
