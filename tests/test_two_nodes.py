"""`accelerate_configs/2node_16gpu.yaml`'s shape on one machine: two nodes on the loopback address, one
CPU process each (gloo), for both trainers. What this proves and what only a real cluster can show:
docs/training.md "Past one machine"."""

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import ACCELERATE, REPO, TWO_RANK_LAUNCH, metrics_rows, run

pytestmark = [pytest.mark.slow, TWO_RANK_LAUNCH]


def free_port() -> str:
    """A port nobody listens on now: each launch gets its own (accelerate refuses a port still held
    by the previous launch's closing sockets)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def node_command(machine_rank: int, script: str, args: list[str], port: str) -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        "accelerate_configs/2node_16gpu.yaml",
        "--num_processes",
        "2",  # in all: one per node
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
        "--mixed_precision",
        "no",
        script,
        *args,
    ]


def start_nodes(script: str, args: list[str], logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return [
        subprocess.Popen(
            node_command(rank, script, args, port),
            cwd=REPO,
            stdout=(logs / f"node{rank}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL every process of a node, as a lost machine. torchrun starts its workers in sessions
    of their own: killing the launcher's process group alone leaves its rank training."""
    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(node.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    node.wait(timeout=30)


def run_two_nodes(script: str, args: list[str], logs: Path, timeout: float = 600) -> None:
    nodes = start_nodes(script, args, logs)
    codes = [node.wait(timeout=timeout) for node in nodes]
    assert codes == [0, 0], "\n".join(f"node {r}: {(logs / f'node{r}.log').read_text()[-3000:]}" for r in (0, 1))


MEASURED_SUFFIXES = ("_per_s", "_time_s", "_gib")  # wall time and memory: a re-run measures them anew


def without_measured(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(MEASURED_SUFFIXES)} for row in metrics]


def test_train_soft_arm_on_two_nodes_equals_one_node_and_resumes(train_args, tmp_path):
    args = [*train_args, "train.steps=4", "train.log_every=1", "train.val_every=2", "train.save_every=2"]
    single = tmp_path / "single"
    run(
        [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "scripts/train_soft_arm.py"]
        + [*args, f"output_dir={single}"]
    )
    nodes = tmp_path / "nodes"
    run_two_nodes("scripts/train_soft_arm.py", [*args, f"output_dir={nodes}"], tmp_path / "logs")
    for rank in (0, 1):
        assert f"[rank {rank}] processes: 2 " in (nodes / f"train_rank{rank}.log").read_text()
    # the same losses, validation and learning rate, step for step
    assert without_measured(metrics_rows(nodes)) == without_measured(metrics_rows(single))

    # node 0 wrote the checkpoints (the main process); both nodes resume from its step 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(nodes / "checkpoints/step_00000002"), str(resumed / "checkpoints")], check=True)
    run_two_nodes("scripts/train_soft_arm.py", [*args, f"output_dir={resumed}", "--resume", "latest"], tmp_path / "r")
    for rank in (0, 1):
        assert "at step 2" in (resumed / f"train_rank{rank}.log").read_text()
    assert without_measured(metrics_rows(resumed)) == without_measured(
        [row for row in metrics_rows(single) if row["step"] > 2]
    )


def test_train_ript_on_two_nodes_equals_one_node(tokenizer_dir, tmp_path):
    args = ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", "train.iterations=1"]
    single = tmp_path / "single"
    run(
        [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "scripts/train_ript_pi0.py"]
        + [*args, f"output_dir={single}"]
    )
    nodes = tmp_path / "nodes"
    run_two_nodes("scripts/train_ript_pi0.py", [*args, f"output_dir={nodes}"], tmp_path / "logs")
    got, expected = without_measured(metrics_rows(nodes)), without_measured(metrics_rows(single))
    assert got == expected and got[0]["ript/episodes"] == 4  # 2 ranks x K = 2, gathered across the nodes


def test_a_killed_node_ends_the_other(train_args, tmp_path):
    """Node 1 killed whole (SIGKILL, as a lost machine) after the second logged step: node 0 must not
    wait on the collective forever; it fails within `train.collective_timeout_s`."""
    output_dir = tmp_path / "run"
    args = [
        *train_args,
        "train.steps=100000",
        "train.log_every=1",
        "train.val_every=100000",
        "train.collective_timeout_s=30",  # what a collective may wait (the default is 15 minutes)
        f"output_dir={output_dir}",
    ]
    nodes = start_nodes("scripts/train_soft_arm.py", args, tmp_path / "logs")
    log = output_dir / "train_rank0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 2 loss" in log.read_text()):
        assert nodes[0].poll() is None, (tmp_path / "logs/node0.log").read_text()[-3000:]
        time.sleep(0.5)
    assert log.exists() and "step 2 loss" in log.read_text(), (tmp_path / "logs/node0.log").read_text()[-3000:]
    kill_node(nodes[1])
    killed_at = time.time()
    try:
        code = nodes[0].wait(timeout=180)
    finally:
        kill_node(nodes[0])  # what is left of it on a failure
    assert code != 0, "node 0 reported success after losing node 1"
    print(f"node 0 exited {code} {time.time() - killed_at:.1f} s after node 1 was killed")
