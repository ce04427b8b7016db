"""`make smoke-full`: the real 4 B pi0 (PaliGemma 2 B + the 300 M expert, 4028 M parameters) on the
CPU in bf16 storage, batch 1, through the project's scripts. Each item's wall time and peak resident
memory go to docs/results/full_size_cpu/ (report.json, report.md).

Not part of `make test` (marker `full_size`); the items run in file order and share one training run.
`SMOKE_SIZE=tiny` runs the same checks at the tiny size in about two minutes (for editing this file;
its report goes to outputs/full_size_smoke_tiny/).
"""

import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO, metrics_rows
from lerobot.configs import FeatureType, PreTrainedConfig
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from safetensors import safe_open

from lib.policies.flag_pi0 import PI0CFGPolicy, PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.loading import CheckpointError, load_pretrained_policy
from lib.policies.processors import load_pi0_processors, load_tokenizer
from lib.policies.sizes import model_size_context

pytestmark = pytest.mark.full_size

SIZE = os.environ.get("SMOKE_SIZE", "full")
REPORT_DIR = REPO / ("docs/results/full_size_cpu" if SIZE == "full" else "outputs/full_size_smoke_tiny")
FULL_PARAMETERS, FULL_EXPERT_ONLY_TRAINED = "4028.05 M parameters", "578.07 M trained"
# bf16 storage, the VLM frozen: what fits this project's 2-core, 24 GiB CPU machine
FULL_SIZE_ARGS = [f"model.pretrained={SIZE}", "model.dtype=bfloat16", "model.train_expert_only=true"]
# 4 expert-only steps at batch 1, checkpoints at steps 2 and 4
SOFT_ARM_RUN = ["data.batch_size=1", "data.num_workers=0", "train.steps=4", "train.log_every=1", "train.val_every=4"]
SOFT_ARM_RUN += ["train.val_batches=1", "train.save_every=2", "train.keep_last=2"]
TIMED_CALLS = 2  # after one warm-up call; a full-size call takes seconds on a CPU


# ---- measurement: each item's wall time and peak resident memory, written as the report ----


def reset_peak_rss() -> None:
    """Linux: restart this process's VmHWM (peak resident memory) from its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_gib() -> float:
    """This machine's memory (MemTotal)."""
    meminfo = Path("/proc/meminfo").read_text()
    return next(int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")) / 2**20


def peak_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20


class Report:
    def __init__(self) -> None:
        self.items: list[dict] = []

    @contextlib.contextmanager
    def measured(self, item: str, **details):
        """Time an in-process item and record its peak resident memory."""
        reset_peak_rss()
        start = time.perf_counter()
        row = {"item": item, "where": "in the test process", **details}
        yield row
        row.update(wall_s=round(time.perf_counter() - start, 1), peak_rss_gib=round(peak_rss_gib(), 2))
        self.items.append(row)

    def run(self, item: str, command: list[str], log: Path, **details) -> str:
        """Run a script as a child process; record its wall time and peak resident memory (its own
        rusage, from wait4). Returns its output; a failure shows the tail."""
        start = time.perf_counter()
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output = log.read_text()
        assert process.returncode == 0, f"{' '.join(command)} exited {process.returncode}\n{output[-6000:]}"
        self.items.append(
            {
                "item": item,
                "where": "child process",
                "wall_s": round(time.perf_counter() - start, 1),
                "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
                **details,
            }
        )
        return output

    def note(self, item: str, **details) -> None:
        self.items.append({"item": item, **details})

    def write(self) -> None:
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        header = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit.stdout.strip(),
            "model_size": SIZE,
            "machine": f"{os.cpu_count()} CPU cores, {memory_gib():.1f} GiB memory, {platform.machine()}",
            "torch": torch.__version__,
        }
        (REPORT_DIR / "report.json").write_text(json.dumps({**header, "items": self.items}, indent=2) + "\n")
        lines = [
            "# Full-size pi0 on the CPU (`make smoke-full`)",
            "",
            *(f"- {key}: {value}" for key, value in header.items()),
            "",
            "| item | wall (s) | peak RSS (GiB) | measured |",
            "|---|---:|---:|---|",
        ]
        for row in self.items:
            extra = "; ".join(
                f"{k}: {v}" for k, v in row.items() if k not in ("item", "wall_s", "peak_rss_gib", "where")
            )
            lines.append(f"| {row['item']} | {row.get('wall_s', '-')} | {row.get('peak_rss_gib', '-')} | {extra} |")
        (REPORT_DIR / "report.md").write_text("\n".join(lines) + "\n")


def two_rank_fsdp_note(report: Report) -> None:
    """2-rank FSDP (`8gpu_fsdp.yaml`, gloo) at full size, judged from this run's measured peaks: each
    rank builds or loads the whole policy before FSDP shards it."""
    trained = [row["peak_rss_gib"] for row in report.items if row["item"].startswith("train_soft_arm.py")]
    if not trained:
        return
    per_rank, memory = max(trained), memory_gib()
    report.note(
        "2-rank FSDP (8gpu_fsdp.yaml, gloo)",
        status="not run: does not fit" if 2 * per_rank > memory else "fits: not run yet",
        needs=(
            f"2 x {per_rank:.1f} GiB (the measured peak of one training process, which builds or loads the whole "
            f"policy before FSDP shards it) = {2 * per_rank:.1f} GiB against {memory:.1f} GiB here; to fit, every "
            "rank but rank 0 would build on the meta device and receive the weights from rank 0 "
            "(accelerate's fsdp_cpu_ram_efficient_loading with sync_module_states)"
        ),
    )


@pytest.fixture(scope="module")
def report():
    report = Report()
    yield report
    two_rank_fsdp_note(report)
    report.write()


# ---- helpers ----


def release_memory() -> None:
    """Give freed tensors' memory back to the OS before the next child process needs it: glibc keeps
    freed heap chunks (most weight tensors are below its mmap threshold), and this process would hold
    a full-size policy's 8 GB beside the next script's."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in metrics_rows(output_dir) if "train/loss" in row}


def same_weights(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same tensors (read one at a time: 8 GB files)."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = set(fa.keys())  # noqa: SIM118 (safe_open is not a dict)
        return keys == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)


def policy_matches_file(policy: torch.nn.Module, weights_file: Path) -> bool:
    state = policy.state_dict()
    with safe_open(weights_file, "pt") as saved:
        keys = set(saved.keys())  # noqa: SIM118
        return keys <= set(state) and all(torch.equal(saved.get_tensor(k), state[k]) for k in keys)


def checkpoint_batch(checkpoint: Path) -> dict:
    """One observation of the checkpoint's own input features, through its saved preprocessor."""
    config = PreTrainedConfig.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(0)
    observation = {
        key: torch.rand(feature.shape, generator=generator)
        for key, feature in config.input_features.items()
        if feature.type in (FeatureType.VISUAL, FeatureType.STATE)
    }
    preprocessor, _ = load_pi0_processors(checkpoint, load_tokenizer(checkpoint))
    return preprocessor({**observation, "task": "touch the red ball"})


def timed_chunks(policy: PI0Policy, batch: dict, noise: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The action chunk for `noise`, and the median wall time of `TIMED_CALLS` calls after a warm-up."""
    with torch.no_grad():
        actions = policy.predict_action_chunk(batch, noise=noise)
        times = []
        for _ in range(TIMED_CALLS):
            start = time.perf_counter()
            again = policy.predict_action_chunk(batch, noise=noise)
            times.append(time.perf_counter() - start)
    assert torch.equal(again, actions)
    return actions, sorted(times)[len(times) // 2]


def chunk_noise(policy: PI0Policy) -> torch.Tensor:
    shape = (1, policy.config.chunk_size, policy.config.max_action_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def pretrained(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoints/step_{step:08d}/pretrained_model"


# ---- the items ----


@pytest.fixture(scope="class")
def soft_arm_run(tmp_path_factory, train_args, report) -> Iterator[Path]:
    """`train_soft_arm.py` from a fresh full-size graph pi0: 4 expert-only steps, saved at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("full_size") / "soft_arm"
    args = [*train_args, *FULL_SIZE_ARGS, *SOFT_ARM_RUN]
    output = report.run(
        "train_soft_arm.py: fresh graph pi0, 4 expert-only steps, 2 saves",
        [PYTHON, "scripts/train_soft_arm.py", *args, f"output_dir={run_dir}"],
        run_dir.with_name("soft_arm.log"),
    )
    if SIZE == "full":
        assert FULL_PARAMETERS in output and FULL_EXPERT_ONLY_TRAINED in output, output[-3000:]
    yield run_dir
    shutil.rmtree(run_dir)


class TestSoftArmAtFullSize:
    """`train_soft_arm.py`'s run and what is done with its checkpoint; the run's 27 GB of checkpoints
    are deleted when the class is done (`soft_arm_run`), before the RIPT items write theirs."""

    def test_train_save_checked_load_sample_and_resume_exactly(self, soft_arm_run, train_args, report, tmp_path):
        checkpoint = pretrained(soft_arm_run, 4)
        weights = checkpoint / "model.safetensors"
        report.note("checkpoint written", weights_gb=round(weights.stat().st_size / 1e9, 2))

        # The checked load of 8 GB of weights: every tensor is the file's, or it refuses. A truncated
        # copy is refused by name before anything is built (no silent random start).
        with report.measured("PI0GraphPolicy.from_pretrained (checked load)") as row:
            policy = PI0GraphPolicy.from_pretrained(checkpoint)
        assert policy_matches_file(policy, weights)
        truncated = tmp_path / "truncated"
        truncated.mkdir()
        (truncated / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
        with weights.open("rb") as source:
            (truncated / "model.safetensors").write_bytes(source.read(weights.stat().st_size // 2))
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            PI0GraphPolicy.from_pretrained(truncated)

        batch = checkpoint_batch(checkpoint)
        with report.measured("graph pi0 predict_action_chunk, batch 1") as row:
            actions, seconds = timed_chunks(policy, batch, chunk_noise(policy))
            row["median_s"] = round(seconds, 2)
        assert actions.shape == (1, policy.config.chunk_size, 10) and torch.isfinite(actions).all()
        del policy
        release_memory()

        # --resume latest from the step-2 checkpoint (hard links: no 12 GB copy) continues exactly.
        resumed = tmp_path / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        subprocess.run(
            ["cp", "-al", str(soft_arm_run / "checkpoints/step_00000002"), str(resumed / "checkpoints")], check=True
        )
        args = [*train_args, *FULL_SIZE_ARGS, *SOFT_ARM_RUN]
        output = report.run(
            "train_soft_arm.py --resume latest from step 2",
            [PYTHON, "scripts/train_soft_arm.py", *args, f"output_dir={resumed}", "--resume", "latest"],
            tmp_path / "resumed.log",
        )
        assert "at step 2" in output
        expected, got = losses(soft_arm_run), losses(resumed)
        assert sorted(got) == [3, 4] and all(got[step] == expected[step] for step in (3, 4)), (got, expected)
        assert same_weights(pretrained(resumed, 4) / "model.safetensors", weights)
        report.items[-1]["exact"] = f"losses at steps 3, 4 and the final weights equal the uninterrupted run's {got}"
        shutil.rmtree(resumed)  # 13 GB of checkpoints: the disk is needed by the next items

    def test_lora_from_the_saved_full_size_checkpoint(self, soft_arm_run, train_args, report, tmp_path):
        """LoRA on the saved checkpoint: only adapters (and the graph encoder) train; the checkpoint holds the
        merged policy, whose LoRA-targeted weights are the base's plus scale * B @ A of the saved adapters."""
        base = pretrained(soft_arm_run, 4)
        args = [*train_args, f"model.pretrained={base}", "model.dtype=bfloat16", "model.lora_rank=4"]
        args += ["data.batch_size=1", "data.num_workers=0", "train.steps=2", "train.save_every=2", "train.val_every=2"]
        args += ["train.val_batches=1", "train.log_every=1"]
        output = report.run(
            "train_soft_arm.py with LoRA (rank 4) from the saved checkpoint, 2 steps",
            [PYTHON, "scripts/train_soft_arm.py", *args, f"output_dir={tmp_path}"],
            tmp_path / "lora.log",
        )
        assert "M trained" in output
        merged = pretrained(tmp_path, 2)
        adapter_config = json.loads((merged / "adapter/adapter_config.json").read_text())
        scale = adapter_config["lora_alpha"] / adapter_config["r"]
        with (
            safe_open(merged / "adapter/adapter_model.safetensors", "pt") as adapters,
            safe_open(merged / "model.safetensors", "pt") as merged_weights,
            safe_open(base / "model.safetensors", "pt") as base_weights,
        ):
            a_keys = sorted(k for k in adapters.keys() if k.endswith(".lora_A.weight"))  # noqa: SIM118
            assert a_keys and not any(".lora_" in k for k in merged_weights.keys())  # noqa: SIM118
            checked = 0
            for a_key in a_keys[:: max(1, len(a_keys) // 4)]:  # a few targets of every kind
                module = a_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                lora_a, lora_b = (
                    adapters.get_tensor(a_key).float(),
                    adapters.get_tensor(a_key.replace("lora_A", "lora_B")).float(),
                )
                expected = base_weights.get_tensor(f"{module}.weight").float() + scale * lora_b @ lora_a
                torch.testing.assert_close(
                    merged_weights.get_tensor(f"{module}.weight").float(), expected, rtol=0.02, atol=2e-3
                )
                checked += 1
        report.items[-1]["merged"] = f"{len(a_keys)} adapted matrices; {checked} checked as base + {scale:g} B A"
        shutil.rmtree(tmp_path / "checkpoints")

    def test_guided_sampling_of_the_flag_policy(self, soft_arm_run, report):
        """The graph checkpoint as the flag policy RL starts from (zero flag embedding, then a random one
        so the two branches differ): plain (w = 1, one branch) against guided (w = 2, both branches)."""
        checkpoint = pretrained(soft_arm_run, 4)
        config = PI0GraphCFGConfig.from_config(PreTrainedConfig.from_pretrained(checkpoint), guidance_weight=1.0)
        with report.measured("flag policy from the graph checkpoint (checked load)"):
            policy = load_pretrained_policy(checkpoint, PI0GraphCFGPolicy, config)
        torch.nn.init.normal_(policy.model.condition_embedding.weight, std=0.5)
        batch, noise = checkpoint_batch(checkpoint), chunk_noise(policy)
        with report.measured("flag policy predict_action_chunk, w = 1 (plain)") as row:
            plain, plain_s = timed_chunks(policy, batch, noise)
            row["median_s"] = round(plain_s, 2)
        policy.config.guidance_weight = 2.0
        with report.measured("flag policy predict_action_chunk, w = 2 (guided)") as row:
            guided, guided_s = timed_chunks(policy, batch, noise)
            row.update(median_s=round(guided_s, 2), guided_over_plain=round(guided_s / plain_s, 2))
        assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
        del policy
        release_memory()


@pytest.fixture(scope="module")
def ript_run(tmp_path_factory, tokenizer_dir, report) -> Path:
    """`train_ript_pi0.py` on LIBERO from a fresh full-size flag pi0 (guidance weight 1): one iteration
    (1 simulator, 6-step episodes), saved, then resumed for a second."""
    run_dir = tmp_path_factory.mktemp("full_size_ript") / "ript"
    args = ["--config_path", "configs/minimal_test.yaml", f"model.tokenizer={tokenizer_dir}", *FULL_SIZE_ARGS]
    args += ["model.image_size=224", "model.guidance_weight=1.0", f"output_dir={run_dir}", "train.eval_every=2"]
    report.run(
        "train_ript_pi0.py: fresh flag pi0, 1 LIBERO iteration, saved",
        [PYTHON, "scripts/train_ript_pi0.py", *args, "train.iterations=1"],
        run_dir.with_name("ript.log"),
    )
    output = report.run(
        "train_ript_pi0.py --resume latest: iteration 2 with evaluation",
        [PYTHON, "scripts/train_ript_pi0.py", *args, "train.iterations=2", "--resume", "latest"],
        run_dir.with_name("ript_resumed.log"),
    )
    assert "at iteration 1" in output and "evaluation: success" in output
    assert [row["step"] for row in metrics_rows(run_dir)] == [1, 2]
    return run_dir


def test_ript_iteration_saves_and_resumes(ript_run):
    checkpoint = ript_run / "checkpoints" / "last" / "pretrained_model"
    assert checkpoint.resolve().parent.name == "step_00000002"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["type"] == "pi0_cfg" and saved["model_size"] == SIZE


def test_export_loads_in_lerobots_own_pi0_with_the_same_actions(ript_run, report, tmp_path):
    checkpoint = ript_run / "checkpoints" / "last" / "pretrained_model"
    plain_dir = tmp_path / "plain"
    report.run(
        "export_pi0.py (pi0_cfg at w = 1 -> plain pi0)",
        [PYTHON, "scripts/export_pi0.py", "--checkpoint", str(checkpoint), "--output_dir", str(plain_dir)],
        tmp_path / "export.log",
    )
    batch = checkpoint_batch(checkpoint)
    with report.measured("PI0CFGPolicy.from_pretrained + one chunk"):
        source = PI0CFGPolicy.from_pretrained(checkpoint)
        noise = chunk_noise(source)
        with torch.no_grad():
            expected = source.predict_action_chunk(batch, noise=noise)
    del source
    release_memory()
    with report.measured("LeRobot's PI0Policy.from_pretrained (no size context) + one chunk"):
        with model_size_context(SIZE):  # at full size no context at all: LeRobot's own classes as they are
            plain = PI0Policy.from_pretrained(plain_dir)
        with torch.no_grad():
            got = plain.predict_action_chunk(batch, noise=noise)
    if SIZE == "full":
        assert sum(p.numel() for p in plain.parameters()) > 4e9  # LeRobot built it at full size by itself
    # bf16 storage: the folded flag (state bias + embedding) is rounded once to bf16
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)
    report.items[-1]["max_abs_diff"] = float((got - expected).abs().max())
