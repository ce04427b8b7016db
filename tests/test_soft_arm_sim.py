"""The simulated soft arm: determinism, node features, the scripted expert, its episodes in the
LeRobotDataset, and closed-loop evaluation of a trained tiny checkpoint (real MuJoCo, real files)."""

import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import torch
from helpers import ACCELERATE, PYTHON, REPO, TWO_RANK_LAUNCH, metrics_rows, run
from safetensors.torch import load_file

from lib.data.soft_arm import load_raw_episode, make_soft_arm_datasets
from lib.envs.soft_arm.features import GRAPH_KEY, IMAGE_KEY, NODE_FEATURES, STATE_KEY
from lib.envs.soft_arm.sim import (
    NUM_SEGMENTS,
    SEGMENT_LENGTH,
    SUCCESS_RADIUS,
    SoftArmSim,
    SoftArmVectorRollout,
    distance_shaped_reward,
    expert_policy_fn,
    run_soft_arm_episodes,
)
from lib.policies.flag_pi0 import PI0GraphCFGPolicy
from lib.rl.iteration import MEASURED_KEYS, OPTIONAL_KEYS, RECORD_KEYS
from lib.rl.ript import rollout_groups

IMAGE_SIZE = 48


@pytest.fixture(scope="module")
def sim():
    simulator = SoftArmSim(IMAGE_SIZE)
    yield simulator
    simulator.close()


def rollout(sim: SoftArmSim, seed: int, steps: int = 12) -> list[dict]:
    rng = np.random.default_rng(0)
    observations = [sim.reset(seed)]
    for _ in range(steps):
        observations.append(sim.step(rng.uniform(-1, 1, NUM_SEGMENTS))[0])
    return observations


def test_same_seed_same_episode_whatever_ran_before(sim):
    other = rollout(sim, 12)  # another seed first: other stiffness, damping, ball and start shape
    again = rollout(sim, 11)
    fresh = SoftArmSim(IMAGE_SIZE)
    try:
        first = rollout(fresh, 11)
    finally:
        fresh.close()
    for a, b in zip(first, again, strict=True):
        for key in (IMAGE_KEY, STATE_KEY, GRAPH_KEY):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0][GRAPH_KEY], other[0][GRAPH_KEY])
    assert not np.array_equal(first[-1][IMAGE_KEY], other[-1][IMAGE_KEY])


def test_node_features_follow_their_documented_layout(sim):
    observations = rollout(sim, 3)
    for observation in observations:
        graph = observation[GRAPH_KEY]
        assert graph.shape == (NUM_SEGMENTS, NODE_FEATURES) and graph.dtype == np.float32
        assert np.isfinite(graph).all()
        assert observation[IMAGE_KEY].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    graph = observations[-1][GRAPH_KEY]
    positions = graph[:, 0:3]
    # consecutive nodes are one segment apart along the tangent
    segments = np.diff(np.vstack([[0, 0, 0.02], positions]), axis=0)
    np.testing.assert_allclose(np.linalg.norm(segments, axis=1), SEGMENT_LENGTH, atol=1e-5)
    np.testing.assert_allclose(segments / SEGMENT_LENGTH, graph[:, 6:9], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(graph[:, 9:12], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose((graph[:, 6:9] * graph[:, 9:12]).sum(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(graph[:, 13], observations[-1][STATE_KEY])  # actuation = applied command
    np.testing.assert_allclose(positions + graph[:, 14:17], np.tile(sim.task.ball, (NUM_SEGMENTS, 1)), atol=1e-6)
    assert not np.allclose(graph[:, 3:6], 0)  # the arm moves under random commands


def test_expert_succeeds_on_at_least_90_percent_of_20_seeds():
    episodes = run_soft_arm_episodes(
        list(range(100, 120)), expert_policy_fn(), num_envs=4, replan_steps=1, image_size=IMAGE_SIZE
    )
    successes = [e.success for e in episodes]
    assert np.mean(successes) >= 0.9, [(e.seed, e.final_distance) for e in episodes if not e.success]
    assert all(e.final_distance < 0.03 for e in episodes if e.success)


def test_ript_rollout_groups_run_on_the_soft_arm():
    """The RIPT loop's K-rollouts-per-state step (lib.rl.ript.rollout_groups) on the soft-arm simulators."""
    expert, idle = expert_policy_fn(), lambda observations: np.zeros((len(observations), 1, NUM_SEGMENTS))
    # An expert whose arm stays idle on the second state's episodes: one solved state, one failed.
    states = [{"seed": 100}, {"seed": 101}]
    policy_fn = lambda observations: np.concatenate(  # noqa: E731
        [expert([o]) if o["episode"] < 2 else idle([o]) for o in observations]
    )
    sink = []
    with SoftArmVectorRollout(num_envs=3, replan_steps=1, image_size=IMAGE_SIZE) as envs:
        rewards = rollout_groups(envs, policy_fn, states, 2, sink, True, distance_shaped_reward(0.5))
    # Successes score 1, failures minus half their final distance in success radii: the idle
    # arm ends where it started, far from the ball.
    assert [e.success for e in sink] == [True, True, False, False]
    assert rewards[0].tolist() == [1.0, 1.0]
    assert rewards[1].tolist() == pytest.approx([-0.5 * e.final_distance / SUCCESS_RADIUS for e in sink[2:]])
    assert (rewards[1] < -0.5).all()
    assert len(sink) == 4 and [e.seed for e in sink] == [100, 100, 101, 101]
    assert [len(state["episodes"]) for state in states] == [2, 2]
    assert sink[0].frames and not any(e.frames for e in sink[1:])
    assert all(len(e.windows) == e.length for e in sink)  # one policy call per step at replan_steps=1


def test_a_dead_or_hung_simulator_is_replaced_and_its_episode_rerun():
    """One simulator worker is killed mid-episode, another stops answering (SIGSTOP, a real hang):
    both are replaced, their episodes re-run from the start and end as in a run without faults;
    no worker is left behind."""
    seeds, settings = [100, 101, 102], {"replan_steps": 1, "max_steps": 12, "image_size": IMAGE_SIZE}
    clean = run_soft_arm_episodes(seeds, expert_policy_fn(), num_envs=2, **settings)
    expert, calls = expert_policy_fn(), []
    with SoftArmVectorRollout(num_envs=2, worker_timeout_s=3, **settings) as envs:
        crashing, hanging = envs.worker_pids

        def policy_fn(observations):
            calls.append(len(observations))
            if len(calls) == 3:
                os.kill(crashing, signal.SIGKILL)
            if len(calls) == 6:
                os.kill(hanging, signal.SIGSTOP)
            return expert(observations)

        faulty = envs.run([{"seed": seed} for seed in seeds], policy_fn)
        assert envs.worker_restarts == 2
        workers = envs.worker_pids
    assert [e.retries for e in faulty] == [1, 1, 0]
    for ours, reference in zip(faulty, clean, strict=True):
        assert (ours.seed, ours.success, ours.length, ours.distances) == (
            reference.seed,
            reference.success,
            reference.length,
            reference.distances,
        )
        assert len(ours.windows) == ours.length  # the failed attempt's windows are gone
    assert not any(psutil.pid_exists(pid) for pid in (crashing, hanging, *workers))


def test_simulated_episodes_are_deterministic_resumable_and_convert(tmp_path):
    raw = tmp_path / "raw"
    command = [PYTHON, "data_prep/simulate_soft_arm.py", "--output_dir", str(raw), "--image_size", str(IMAGE_SIZE)]
    run([*command, "--episodes", "3", "--workers", "2", "--seed", "4"])
    first = {p.name: p.read_bytes() for p in raw.glob("episode_*.npz")}
    assert len(first) == 3
    (raw / "episode_000001.npz").unlink()
    result = run([*command, "--episodes", "4", "--workers", "1", "--seed", "4"])
    assert "2 episodes written, 2 kept" in result.stdout
    report = json.loads((raw / "simulation_report.json").read_text())
    assert report["episodes_written"] == 2 and report["episodes_per_minute"] > 0
    # the re-simulated episode equals the deleted one: same seed and index, same data
    for key in ("images", "actions", "graph", "state"):
        deleted = np.load(io.BytesIO(first["episode_000001.npz"]))[key]
        np.testing.assert_array_equal(getattr(load_raw_episode(raw / "episode_000001.npz"), key), deleted)
    episode = load_raw_episode(raw / "episode_000003.npz")
    assert episode.graph.shape[1:] == (NUM_SEGMENTS, NODE_FEATURES) and episode.instruction.endswith("ball")

    dataset = tmp_path / "dataset"  # frames as PNG images here (lossless); the default, video, elsewhere
    run(
        [PYTHON, "data_prep/soft_arm_to_lerobot.py", "--raw_dir", str(raw), "--output_dir", str(dataset), "--no_videos"]
    )
    train, _ = make_soft_arm_datasets(dataset, val_fraction=0.0)
    assert train.meta.total_episodes == 4 and train.meta.video_keys == [] and train.meta.image_keys == [IMAGE_KEY]
    item = train[0]
    assert item[GRAPH_KEY].shape == (NUM_SEGMENTS, NODE_FEATURES) and item["action"].shape == (16, 10)


# ript_soft_arm.py at plumbing size: one seed, 2 states x 2 rollouts an iteration, 6-step episodes.
TINY_RIPT = [
    "seeds=[0]",
    "rl.states_per_draw=2",
    "rl.rollouts_per_state=2",
    "rl.max_draw_rounds=1",
    "env.eval_episodes=2",
    "env.num_envs=2",
    "env.max_steps=6",
    "env.image_size=64",
]


def test_eval_and_ript_soft_arm_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    eval_dir = tmp_path / "eval"
    result = run(
        [
            PYTHON,
            "scripts/eval_soft_arm.py",
            "--checkpoint",
            str(tiny_checkpoint),
            "--num_episodes",
            "3",
            "--num_envs",
            "2",
            "--max_steps",
            "10",
            "--replan_steps",
            "4",
            "--image_size",
            "64",
            "--videos",
            "1",
            "--output_dir",
            str(eval_dir),
        ]
    )
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["episodes"] == 3 and len(summary["per_episode"]) == 3
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["mean_final_distance_m"] > 0
    # a failed episode runs to the step limit; policy calls came in rounds of up to 4 actions
    assert all(e["length"] == 10 or e["success"] for e in summary["per_episode"])
    assert (eval_dir / "distance.png").stat().st_size > 0
    videos = list((eval_dir / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    assert "success" in result.stdout

    # The RIPT experiment script end to end with the original's objective, CFG-RL at w > 1: the
    # plumbing and one real update, not learning (a 2-step policy barely moves).
    ript_dir = tmp_path / "ript"
    ript = [
        PYTHON,
        "scripts/ript_soft_arm.py",
        f"model.pretrained={tiny_checkpoint}",
        f"output_dir={ript_dir}",
        *TINY_RIPT,
        "iterations=1",
        "eval_every=1",
        "rl.objective=cfg_rl",
        "model.guidance_weight=2",
    ]
    run(ript)
    summary = json.loads((ript_dir / "summary.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [0] and summary["objective"] == "cfg_rl, w=2"
    run_summary = summary["runs"][0]
    assert 0.0 <= run_summary["success_before"] <= 1.0 and 0.0 <= run_summary["success_after"] <= 1.0
    assert set(run_summary["curve"]) == {"0", "1"} and run_summary["episodes_used"] == 4
    metrics = metrics_rows(ript_dir / "seed0")
    assert [m["step"] for m in metrics] == [0, 1] and metrics[1]["ript/episodes"] == 4
    assert 0 < metrics[1]["ript/final_distance_m"] < 1
    # The engine's record (lib/rl/iteration.py), as train_ript_pi0.py logs it, plus this driver's own;
    # the loss and the objective's terms only once an update ran
    row = metrics[1]
    optional = {
        *(f"ript/{key}" for key in OPTIONAL_KEYS),
        *(key for key in row if key.startswith("ript/update_") and key != "ript/update_steps"),
    }
    engine_keys = {f"ript/{key}" for key in RECORD_KEYS}
    assert set(row) - optional == {"step", *engine_keys - optional, "ript/final_distance_m", "ript/eval_success_rate"}
    assert (ript_dir / "results.md").read_text().count("\n") == 4 and (ript_dir / "success.png").stat().st_size > 0
    # The RL-trained policy is a loadable checkpoint, with its guidance weight.
    trained = PI0GraphCFGPolicy.from_pretrained(ript_dir / "seed0" / "pretrained_model")
    assert trained.config.guidance_weight == 2.0
    # ... and eval_soft_arm.py scores it like a BC checkpoint.
    rl_eval = tmp_path / "rl_eval"
    eval_args = ["--num_episodes", "2", "--num_envs", "2", "--max_steps", "6", "--image_size", "64", "--videos", "0"]
    checkpoint_args = ["--checkpoint", str(ript_dir / "seed0" / "pretrained_model"), "--output_dir", str(rl_eval)]
    run([PYTHON, "scripts/eval_soft_arm.py", *checkpoint_args, *eval_args, "--attempts", "2"])
    summary = json.loads((rl_eval / "summary.json").read_text())
    assert summary["episodes"] == 4 and [e["seed"] for e in summary["per_episode"]] == [10_000_000, 10_000_001] * 2
    solved = {
        seed: [e["success"] for e in summary["per_episode"] if e["seed"] == seed] for seed in (10_000_000, 10_000_001)
    }
    assert summary["pass_at_attempts"] == sum(any(s) for s in solved.values()) / 2
    assert summary["seeds_by_successes"] == {str(k): sum(sum(s) == k for s in solved.values()) for k in range(3)}


@pytest.mark.slow  # 4 RIPT runs, about 40 s: make test keeps the one above
def test_ript_soft_arm_extends_a_finished_seed_exactly(tmp_path, tiny_checkpoint, dataset_dir):
    """A larger `iterations` with --resume latest extends the finished seed from its checkpoint,
    exactly as a run that never stopped: same rollouts (the policy noise and the sampler position
    decide them), same held-out scores, same outcome history, same weights. With every lever of
    lib/rl on (critic advantages, exploration of failed groups, demonstrations in the update)."""
    ript_dir = tmp_path / "ript"
    ript = [PYTHON, "scripts/ript_soft_arm.py", f"model.pretrained={tiny_checkpoint}", f"output_dir={ript_dir}"]
    ript += [*TINY_RIPT, "iterations=1", "eval_every=1", "rl.objective=cfg_rl", "model.guidance_weight=2"]
    ript += ["rl.advantage=critic", "rl.explore_std=0.3", f"rl.demo_dataset={dataset_dir}", "rl.demos_per_minibatch=2"]
    run(ript)
    assert "resumed from" in run([*ript, "iterations=2", "--resume", "latest"]).stdout
    straight_dir = tmp_path / "ript_straight"
    run([*ript, "iterations=2", f"output_dir={straight_dir}"])

    def comparable(directory):
        rows = metrics_rows(directory / "seed0")
        # the timings differ; NaN (no update in an iteration) is compared as None
        return [
            {k: None if v != v else v for k, v in row.items() if k.removeprefix("ript/") not in MEASURED_KEYS}
            for row in rows
        ]

    extended = comparable(ript_dir)
    assert [row["step"] for row in extended] == [0, 1, 2] and extended == comparable(straight_dir)
    states = [
        json.loads((d / "seed0" / "checkpoints" / "last" / "training_state" / "state.json").read_text())
        for d in (ript_dir, straight_dir)
    ]
    for state in states:  # wall and CPU time differ
        del state["run"]["wall_s"], state["run"]["cpu_s"]
    assert states[0] == states[1] and states[0]["progress"] == {"iteration": 2, "draws_by_rank": [2]}
    rows = metrics_rows(ript_dir / "seed0")[1:]
    assert all(row["ript/update_steps"] > 0 for row in rows)  # demonstrations make every update non-empty
    # each group that all failed (a 2-step policy fails most) was rolled out once more: 2 episodes each
    assert all(row["ript/episodes"] == 4 + 2 * row["ript/explored_groups"] for row in rows)
    assert sum(row["ript/explored_groups"] for row in rows) > 0
    for directory in (ript_dir, straight_dir):
        summary = json.loads((directory / "seed0" / "summary.json").read_text())
        assert summary["episodes_used"] == sum(row["ript/episodes"] for row in rows)
    weights = [load_file(d / "seed0" / "pretrained_model" / "model.safetensors") for d in (ript_dir, straight_dir)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_ript_soft_arm_saves_on_sigterm_and_resumes(tmp_path, tiny_checkpoint):
    """SIGTERM mid-run: the seed finishes its iteration, saves and the script exits 0 without a
    summary; --resume latest runs the rest, each iteration logged once. Then the output_dir
    convention on the finished run: refused, kept, dry-run, and another objective refused."""
    output_dir = tmp_path / "ript"
    command = [PYTHON, "scripts/ript_soft_arm.py", f"model.pretrained={tiny_checkpoint}", f"output_dir={output_dir}"]
    command += [*TINY_RIPT, "iterations=8", "eval_every=100", "save_every=100"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = output_dir / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2):  # iteration 1 logged
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0 and "signal 15 received, saved at iteration" in output, output
    stopped_at = int(output.split("saved at iteration ")[1].split(";")[0])
    assert 1 <= stopped_at < 8 and not (output_dir / "seed0" / "summary.json").exists()
    assert (output_dir / "seed0" / "checkpoints" / f"step_{stopped_at:08d}").is_dir()

    resumed = run([*command, "--resume", "latest"])
    assert "resumed from" in resumed.stdout and f"at iteration {stopped_at}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps == list(range(9))
    assert json.loads((output_dir / "seed0" / "summary.json").read_text())["iterations"] == 8

    # The trainers' output_dir convention: a second run is refused unless it resumes (a finished
    # seed is kept, not run again); a dry run does one iteration and writes nothing.
    refused = run(command, check=False)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr and "Traceback" not in refused.stderr
    assert "keeping the finished run" in run([*command, "--resume", "latest"]).stdout
    dry = run([*command, "--dry_run", "--output_dir", str(tmp_path / "dry")])
    assert "dry run ok: one iteration, 4 episodes" in dry.stdout and not (tmp_path / "dry").exists()
    # Extending it with another objective would be another experiment under the same name: refused
    # with one line naming the key, before anything is written.
    files = {path: path.read_bytes() for path in (output_dir / "seed0").rglob("*") if path.is_file()}
    other = run([*command, "iterations=9", "rl.objective=cfg_rl", "--resume", "latest"], check=False)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "trained with rl.objective=advantage_filtered, this run has rl.objective=cfg_rl" in other.stderr
    assert {path: path.read_bytes() for path in (output_dir / "seed0").rglob("*") if path.is_file()} == files


@TWO_RANK_LAUNCH
@pytest.mark.slow
def test_ript_soft_arm_refuses_a_multi_process_launch(tmp_path):
    """ript_soft_arm.py runs its seeds in one process: under a 2-rank launch every rank would run
    every seed into the same files, so each rank stops with one line before anything is written."""
    output_dir = tmp_path / "run"
    command = [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "scripts/ript_soft_arm.py"]
    result = run([*command, "--config", "configs/ript_soft_arm.yaml", f"output_dir={output_dir}"], check=False)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("error: ript_soft_arm.py runs in one process") == 2
    assert not output_dir.exists()
