"""Predict the GPU memory of one training step of every shipped production config, on a CPU.

    make plan                                        # every row, full size (about 15-25 min on 2 cores)
    python scripts/plan_memory.py --size tiny        # the same rows at the tiny size (the test)
    python scripts/plan_memory.py --only soft_arm    # rows whose name contains "soft_arm"

Nothing is allocated: the real policy (LeRobot's pi0 classes with this project's graph / flag
extensions, built as the training script builds it) is created on the meta device, its parameters
are replaced by fake tensors (`torch._subclasses.FakeTensorMode`), and one real training step -
the script's loss under bf16 autocast, backward, gradient clipping, AdamW step - runs on them
under PyTorch's `torch.distributed._tools.mem_tracker.MemTracker`, which records the bytes every
tensor would hold (parameters, gradients, optimizer state, activations, temporaries) and the
peak. The optimizer state is materialised before the tracked step, so the peak is that of a
steady-state step, not the first one.

What the fake step does not see, and how it is added (each row says which applied):
- DDP (`MULTI_GPU`): DDP's gradient buckets, a second copy of the trained gradients
  (accelerate's default `gradient_as_bucket_view=False`);
- FSDP (full shard over N GPUs): parameters, gradients and optimizer state divided by N, plus the
  largest FSDP unit gathered in bf16 (prefetch: two units at once);
- the GPU itself: the CUDA context and allocator fragmentation. A row "fits" a card when the
  prediction stays under 95 % of it (the measured 69.7 GiB step ran on an 80 GB H100: 88 %).

The fake step runs on the CPU, where autocast casts a slightly different op list than on CUDA;
the `calibration` rows rebuild the bare LeRobot steps measured on an H100 (docs/dependencies.md)
and print the prediction beside the measurement.

Writes `docs/results/memory_plan/plan.md` and `plan.json` (or `--output_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from lib.envs.libero.worker import ACTION_DIM as LIBERO_ACTION_DIM
from lib.envs.libero.worker import AGENTVIEW_KEY, WRIST_KEY
from lib.envs.libero.worker import STATE_DIM as LIBERO_STATE_DIM
from lib.envs.libero.worker import STATE_KEY as LIBERO_STATE_KEY
from lib.envs.soft_arm.features import ACTION_DIM, ACTION_KEY, IMAGE_KEY, NODE_FEATURES, NUM_NODES, STATE_KEY
from lib.policies.flag_pi0 import PI0CFGConfig, PI0CFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphConfig, PI0GraphPolicy
from lib.policies.lora import add_lora_adapters
from lib.policies.sizes import MODEL_SIZES, SizedPI0Config, model_size_context
from lib.run.config import load_config
from lib.run.errors import UserError, exit_code_of
from lib.run.schemas import SoftArmTrainConfig, TrainRIPTConfig

GIB = 2**30
# Card memory as the driver reports it (nvidia-smi, MiB), and the share a step may plan to use.
GPUS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}
USABLE_SHARE = 0.95  # the CUDA context and allocator fragmentation take the rest
SOFT_ARM_STATE_DIM = 10  # lib/envs/soft_arm/sim.py's state (the previous command): its raw format fixes only the size
LORA_RANK = 16


@dataclass
class Case:
    """One predicted step: which policy, built how, fed what, launched how."""

    name: str
    policy: str  # "plain" (LeRobot's PI0Policy), "graph" (train_soft_arm.py), "cfg" (train_ript_pi0.py)
    batch_size: int  # per GPU and micro-step
    chunk_size: int
    dtype: str  # storage dtype of the VLM and expert
    mixed_precision: str  # "bf16" or "no"
    gradient_checkpointing: bool = False
    train_expert_only: bool = False
    freeze_vision_encoder: bool = False
    lora_rank: int = 0
    distributed: str = "NO"  # "NO", "MULTI_GPU" (DDP) or "FSDP"
    num_processes: int = 1
    measured_gib: float | None = None  # the H100 measurement this case reproduces, if any
    config: str = ""  # the training config and launcher it comes from
    extras: dict[str, Any] = field(default_factory=dict)


def calibration_cases() -> list[Case]:
    """The bare LeRobot steps measured on one H100 (docs/dependencies.md): `PI0Policy(PI0Config(
    dtype="bfloat16"))`, bf16 autocast, one 224 px image, 48 tokens, a 50-step chunk, batch 32."""
    bare = {"policy": "plain", "batch_size": 32, "chunk_size": 50, "dtype": "bfloat16", "mixed_precision": "bf16"}
    return [
        Case("calibration: full fine-tuning", measured_gib=69.7, config="LeRobot bare step", **bare),
        Case(
            "calibration: gradient checkpointing",
            gradient_checkpointing=True,
            measured_gib=37.0,
            config="LeRobot bare step",
            **bare,
        ),
        Case(
            "calibration: action expert only",
            train_expert_only=True,
            measured_gib=37.5,
            config="LeRobot bare step",
            **bare,
        ),
    ]


def launcher(path: Path) -> dict[str, Any]:
    """distributed_type, num_processes and mixed_precision of an accelerate config file."""
    settings = yaml.safe_load(path.read_text())
    return {
        "distributed": settings.get("distributed_type", "NO"),
        "num_processes": int(settings.get("num_processes", 1)),
        "mixed_precision": settings.get("mixed_precision", "no"),
    }


MODES = {
    "as shipped": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "action expert only": {"train_expert_only": True},
    f"LoRA r={LORA_RANK}": {"lora_rank": LORA_RANK},
}


def shipped_cases(root: Path) -> list[Case]:
    """Every shipped production config x the accelerate configs it is meant for x fine-tuning mode,
    read from the files themselves (so a change to a config changes its rows)."""
    cases = []
    soft_arm = load_config(SoftArmTrainConfig, root / "configs/soft_arm_config.yaml")
    ript = load_config(TrainRIPTConfig, root / "configs/train_pi0_cfg_rl.yaml")
    trainers = [
        (
            "soft_arm_config.yaml",
            soft_arm.model,
            {"policy": "graph", "batch_size": soft_arm.data.batch_size, "chunk_size": soft_arm.data.chunk_size},
        ),
        (
            "train_pi0_cfg_rl.yaml",
            ript.model,
            # cfg_rl runs both branches as one forward over the doubled minibatch (lib/rl/objectives.py)
            {"policy": "cfg", "batch_size": ript.rl.minibatch_size, "chunk_size": ript.model.chunk_size},
        ),
    ]
    for config_name, model, shape in trainers:
        # The launcher varies fastest: its rows share one fake step (`predict`), so a partial run
        # (`--only`) still compares the launchers of each mode.
        for mode, switches in MODES.items():
            for launch_name in ("8gpu.yaml", "8gpu_fsdp.yaml"):
                launch = launcher(root / "accelerate_configs" / launch_name)
                if launch["distributed"] == "FSDP" and shape["policy"] == "cfg":
                    continue  # train_ript_pi0.py refuses FSDP (its rollouts sample outside FSDP's forward)
                flags = {
                    "gradient_checkpointing": model.gradient_checkpointing,
                    "train_expert_only": model.train_expert_only,
                    "freeze_vision_encoder": model.freeze_vision_encoder,
                    "lora_rank": model.lora_rank,
                    **switches,
                }
                cases.append(
                    Case(
                        f"{config_name} + {launch_name}: {mode}",
                        dtype=model.dtype,
                        config=f"configs/{config_name} + accelerate_configs/{launch_name}",
                        **shape,
                        **launch,
                        **flags,
                    )
                )
    return cases


# --- Building the real policy on fake tensors ----------------------------------------------------


def policy_config(case: Case, size: str) -> PI0Config:
    common = {
        "dtype": case.dtype,
        "chunk_size": case.chunk_size,
        "n_action_steps": case.chunk_size,
        "gradient_checkpointing": case.gradient_checkpointing,
        "train_expert_only": case.train_expert_only,
        "freeze_vision_encoder": case.freeze_vision_encoder,
    }
    image = PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224))
    if case.policy == "graph":
        return PI0GraphConfig(
            model_size=size,
            input_features={
                IMAGE_KEY: image,
                STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(SOFT_ARM_STATE_DIM,)),
                GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(NUM_NODES, NODE_FEATURES)),
            },
            output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
            **common,
        )
    features = {
        AGENTVIEW_KEY: image,
        WRIST_KEY: image,
        LIBERO_STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(LIBERO_STATE_DIM,)),
    }
    action = {ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(LIBERO_ACTION_DIM,))}
    if case.policy == "cfg":
        return PI0CFGConfig(model_size=size, input_features=features, output_features=action, **common)
    # LeRobot's own policy: one camera, as in the measured bare step
    return SizedPI0Config(
        model_size=size,
        input_features={AGENTVIEW_KEY: image, LIBERO_STATE_KEY: features[LIBERO_STATE_KEY]},
        output_features=action,
        **common,
    )


POLICY_CLASSES = {"plain": PI0Policy, "graph": PI0GraphPolicy, "cfg": PI0CFGPolicy}


def build_on_meta(case: Case, size: str) -> torch.nn.Module:
    """The policy as its script builds it, with no storage behind its tensors."""
    config = policy_config(case, size)
    config.device = "meta"  # PI0Policy.__init__ moves the network to config.device
    with torch.device("meta"), model_size_context(size):
        policy = POLICY_CLASSES[case.policy](config)
        return add_lora_adapters(policy, case.lora_rank) if case.lora_rank else policy


def materialize_fake(module: torch.nn.Module, device: str) -> None:
    """Replace every parameter and buffer of `module` by a fake tensor of the same shape, dtype
    and requires_grad (tied parameters stay tied). Must run inside the FakeTensorMode."""
    made: dict[int, torch.Tensor] = {}
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in made:
                made[id(parameter)] = torch.nn.Parameter(
                    torch.empty(parameter.shape, dtype=parameter.dtype, device=device),
                    requires_grad=parameter.requires_grad,
                )
            submodule._parameters[name] = made[id(parameter)]
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)


def fake_batch(case: Case, policy: Any, device: str) -> dict[str, torch.Tensor]:
    """A training batch of the case's shapes (values are irrelevant: nothing is computed)."""
    config = policy.config
    batch_size, tokens = case.batch_size, config.tokenizer_max_length
    batch = {
        key: torch.zeros(batch_size, *feature.shape, device=device) for key, feature in config.input_features.items()
    }
    action_dim = config.output_features[ACTION_KEY].shape[0]
    batch[ACTION_KEY] = torch.zeros(batch_size, case.chunk_size, action_dim, device=device)
    batch["action_is_pad"] = torch.zeros(batch_size, case.chunk_size, dtype=torch.bool, device=device)
    batch["observation.language.tokens"] = torch.zeros(batch_size, tokens, dtype=torch.long, device=device)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, tokens, dtype=torch.bool, device=device)
    return batch


def training_step(case: Case, policy: Any, optimizer: torch.optim.Optimizer, device: str) -> None:
    """One step of the case's script: loss (the RL objective for `cfg`), backward, clip, AdamW."""
    config = policy.config if not case.lora_rank else policy.get_base_model().config
    batch = fake_batch(case, policy if not case.lora_rank else policy.get_base_model(), device)
    noise = torch.zeros(case.batch_size, case.chunk_size, config.max_action_dim, device=device)
    flow_time = torch.full((case.batch_size,), 0.5, device=device)
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16) if case.mixed_precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        if case.policy == "cfg":
            advantages = torch.ones(case.batch_size, device=device)
            loss, _ = policy(batch, advantages, noise, flow_time, objective="cfg_rl", alpha=0.1)
        elif case.policy == "graph":
            loss, _ = policy(batch, noise=noise, time=flow_time)
        else:  # LeRobot's network as PI0Policy.forward calls it, less its host reads of the loss
            images, image_masks = policy._preprocess_images(batch)
            tokens, token_masks = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
            state, actions = policy.prepare_state(batch), policy.prepare_action(batch)
            loss = policy.model(images, image_masks, tokens, token_masks, state, actions, noise, flow_time).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _NoHook:
    def remove(self) -> None:
        pass


class FrozenAwareMemTracker(MemTracker):
    """PyTorch's MemTracker, able to track frozen parameters: torch 2.11's registers a gradient hook
    on every parameter of a module it enters, which raises on one that needs no gradient (a frozen
    VLM). Frozen parameters are marked as hooked already; they are still counted."""

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        for parameter in module.parameters():
            if not parameter.requires_grad and self._param_to_grad_hook_handles.get(parameter) is None:
                self._param_to_grad_hook_handles[parameter] = (_NoHook(), _NoHook())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


@dataclass
class Prediction:
    case: Case
    step_peak: dict[str, float]  # GiB by kind at the fake step's peak
    trained_gib: float  # trained parameters' bytes (gradients and DDP buckets are this size)
    largest_unit_gib: float  # the largest Linear/Embedding weight in bf16 (one FSDP unit)
    parameters: int
    trained_parameters: int
    per_gpu_gib: float = 0.0
    added: str = ""
    seconds: float = 0.0

    def fits(self, gpu_bytes: int) -> bool:
        return self.per_gpu_gib * GIB <= USABLE_SHARE * gpu_bytes


# What a fake step depends on: rows that differ only in the launcher share one step.
STEP_FIELDS = (
    "policy",
    "batch_size",
    "chunk_size",
    "dtype",
    "mixed_precision",
    "gradient_checkpointing",
    "train_expert_only",
    "freeze_vision_encoder",
    "lora_rank",
)
_steps: dict[tuple, Prediction] = {}


def predict(case: Case, size: str) -> Prediction:
    """The fake step of `case` (computed once per `STEP_FIELDS`), then the launcher's additions."""
    key = (size, *(getattr(case, name) for name in STEP_FIELDS))
    if key not in _steps:
        _steps[key] = fake_step(case, size)
    prediction = dataclasses.replace(_steps[key], case=case)
    total = prediction.step_peak["Total"]
    if case.distributed == "MULTI_GPU":
        prediction.per_gpu_gib = total + prediction.trained_gib
        prediction.added = f"+ DDP buckets {prediction.trained_gib:.1f}"
    elif case.distributed == "FSDP":
        states = sum(prediction.step_peak[kind] for kind in ("Parameter", "Gradient", "Optstate"))
        gathered = 2 * prediction.largest_unit_gib
        prediction.per_gpu_gib = total - states + states / case.num_processes + gathered
        prediction.added = f"states {states:.1f} / {case.num_processes} + 2 gathered units {gathered:.1f}"
    else:
        prediction.per_gpu_gib = total
    return prediction


def steady_state_optimizer(policy: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trained parameters with its moments already made (one step on zero
    gradients): a step tracked after it is a steady-state step, not the first one."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, foreach=False)
    for parameter in trained:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def fake_step(case: Case, size: str) -> Prediction:
    """The step of `case` on fake tensors under MemTracker."""
    start = time.perf_counter()
    device = "cpu"  # fake tensors need no device; autocast needs one that exists here
    policy = build_on_meta(case, size)
    with FakeTensorMode(shape_env=ShapeEnv()):  # a ShapeEnv lets LeRobot's `.item()` calls through
        materialize_fake(policy, device)
        policy.train()
        optimizer = steady_state_optimizer(policy)
        trained = [p for p in policy.parameters() if p.requires_grad]
        tracker = FrozenAwareMemTracker()
        tracker.track_external(policy, optimizer)
        with tracker:
            training_step(case, policy, optimizer, device)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    step_peak = {str(getattr(kind, "value", kind)): value / GIB for kind, value in peak.items()}
    units = [m.weight for m in policy.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    prediction = Prediction(
        case=case,
        step_peak=step_peak,
        trained_gib=sum(p.numel() * p.element_size() for p in trained) / GIB,
        largest_unit_gib=max(w.numel() for w in units) * 2 / GIB,
        parameters=sum(p.numel() for p in policy.parameters()),
        trained_parameters=sum(p.numel() for p in trained),
    )
    prediction.seconds = time.perf_counter() - start
    return prediction


# --- Report --------------------------------------------------------------------------------------


def table(predictions: list[Prediction]) -> str:
    gpus = list(GPUS)
    header = (
        "| case | batch / GPU | params / trained (M) | step peak: params + grads + optimizer + activations + temp "
        "(GiB) | launcher | predicted GiB / GPU | measured | " + " | ".join(f"fits {gpu}" for gpu in gpus) + " |"
    )
    lines = [header, "|" + "---|" * (7 + len(gpus))]
    for p in predictions:
        s = p.step_peak
        breakdown = " + ".join(f"{s[k]:.1f}" for k in ("Parameter", "Gradient", "Optstate", "Activation", "Temp"))
        measured = (
            ""
            if p.case.measured_gib is None
            else f"{p.case.measured_gib:.1f} ({p.per_gpu_gib / p.case.measured_gib - 1:+.0%})"
        )
        fits = " | ".join("yes" if p.fits(GPUS[gpu]) else "**no**" for gpu in gpus)
        lines.append(
            f"| {p.case.name} | {p.case.batch_size} | {p.parameters / 1e6:.2f} / {p.trained_parameters / 1e6:.2f} | "
            f"{breakdown} | {p.added or '-'} | **{p.per_gpu_gib:.1f}** | {measured or '-'} | {fits} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=MODEL_SIZES, help="model size to predict (tiny: the test)")
    parser.add_argument("--only", default=None, help="only the rows whose name contains this text")
    parser.add_argument("--output_dir", type=Path, default=Path("docs/results/memory_plan"))
    parser.add_argument("--root", type=Path, default=Path("."), help="where configs/ and accelerate_configs/ are")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cases = calibration_cases() + shipped_cases(args.root)
    if args.only:
        cases = [case for case in cases if args.only in case.name]
        if not cases:
            raise UserError(f"--only {args.only!r} matches no row")
    predictions = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(cases, 1):
        prediction = predict(case, args.size)
        predictions.append(prediction)
        seconds = prediction.seconds
        print(
            f"[{index}/{len(cases)}] {case.name}: {prediction.per_gpu_gib:.2f} GiB per GPU ({seconds:.0f} s)",
            flush=True,
        )
        write_plan(args.output_dir, predictions, args.size)  # after every row: a stopped run keeps its rows
    print(table(predictions))
    print(f"wrote {args.output_dir / 'plan.md'} and plan.json")
    return 0


def write_plan(output_dir: Path, predictions: list[Prediction], size: str) -> None:
    (output_dir / "plan.md").write_text(
        f"Predicted peak GPU memory of one training step, {size} size (`scripts/plan_memory.py`; "
        f"a row fits a card below {USABLE_SHARE:.0%} of its memory).\n\n{table(predictions)}\n"
    )
    rows = [
        {**asdict(p), "fits": {gpu: p.fits(capacity) for gpu, capacity in GPUS.items()}, "size": size}
        for p in predictions
    ]
    (output_dir / "plan.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
