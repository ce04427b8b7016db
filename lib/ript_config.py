"""The RIPT config schema shared by the stage scripts 09-13 and `train_ript_pi0.py`: defaults and
types here, values from `configs/*.yaml` and `key=value` overrides (lib/config.py)."""

from dataclasses import dataclass, field
from typing import Any, Optional

from lib.config import check

# The update objectives (lib/cfg_pi0.py): the seed's CFG-RL, the advantage-filtered baseline, and
# behaviour cloning on every window (reward ignored: the no-reward control).
OBJECTIVES = ("cfg_rl", "advantage_filtered", "behavior_cloning")


@dataclass
class ModelConfig:
    pretrained: str = "tiny"  # "tiny" / "full" (random init), or a local path / hub id of a pi0 checkpoint
    tokenizer: str = "artifacts/tokenizer"  # local dir or hub id (google/paligemma-3b-pt-224)
    dtype: str = "float32"
    chunk_size: int = 50
    num_inference_steps: int = 10
    image_size: int = 224
    guidance_weight: float = 1.0  # w in v = v_null + w (v_cond - v_null); 1 = plain conditional


@dataclass
class EnvConfig:
    benchmark: str = "libero_spatial"
    task_names: Optional[list[str]] = None  # None: every task of the suite
    num_envs: int = 8  # simulator processes per rank
    camera_size: int = 128
    max_steps: Optional[int] = None  # None: the suite's standard limit
    replan_steps: int = 5  # actions executed from each chunk before the next policy call


@dataclass
class RLConfig:
    rollouts_per_state: int = 4  # K
    states_per_draw: int = 4  # init states drawn per rank at a time
    target_groups: int = 4  # informative groups wanted per rank and iteration
    max_draw_rounds: int = 4  # dynamic-sampling draws per iteration at most
    skip_after: int = 3  # a state solved K/K this many times in a row ...
    skip_for: int = 5  # ... is skipped for this many draws
    objective: str = "cfg_rl"  # cfg_rl | advantage_filtered | behavior_cloning
    alpha: float = 0.1  # weight of the unconditional branch in cfg_rl
    update_epochs: int = 4
    minibatch_size: int = 16


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


@dataclass
class TrainConfig:
    iterations: int = 100
    mixed_precision: Optional[str] = None  # None: the launcher's; or "no", "bf16", "fp16"
    eval_every: int = 10
    eval_init_indices: list[int] = field(default_factory=lambda: [0, 1])  # per task, fixed
    save_every: int = 10
    keep_last: int = 3


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])
    project: str = "pi0-ript"
    run_name: str = "ript"
    wandb_mode: str = "offline"
    video_every: int = 10  # a rollout video every N iterations (0: none), from stage 11 on


@dataclass
class RIPTConfig:
    output_dir: str = "outputs/ript"
    seed: int = 42
    resume: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_rl(rl: Any) -> None:
    """Ranges of the `rl` section (shared by the LIBERO and soft-arm configs)."""
    check(rl.rollouts_per_state >= 2, "rl.rollouts_per_state", ">= 2 (leave-one-out)", rl.rollouts_per_state)
    check(rl.objective in OBJECTIVES, "rl.objective", f"one of {list(OBJECTIVES)}", rl.objective)
    for key in ("states_per_draw", "target_groups", "max_draw_rounds", "update_epochs", "minibatch_size"):
        check(rl[key] > 0, f"rl.{key}", "> 0", rl[key])
    check(rl.skip_after > 0, "rl.skip_after", "> 0", rl.skip_after)
    check(rl.skip_for >= 0, "rl.skip_for", ">= 0", rl.skip_for)
    check(rl.alpha >= 0, "rl.alpha", ">= 0", rl.alpha)


def validate_optim(optim: Any) -> None:
    """Ranges of the `optim` section."""
    check(optim.lr > 0, "optim.lr", "> 0", optim.lr)
    check(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "optim.betas",
        "two floats in [0, 1)",
        list(optim.betas),
    )
    check(optim.eps > 0, "optim.eps", "> 0", optim.eps)
    check(optim.weight_decay >= 0, "optim.weight_decay", ">= 0", optim.weight_decay)
    check(optim.grad_clip_norm > 0, "optim.grad_clip_norm", "> 0", optim.grad_clip_norm)


def validate_config(config: Any) -> None:
    """Range checks the types cannot express; a `ConfigError` names the key."""
    validate_rl(config.rl)
    validate_optim(config.optim)
    check(config.env.num_envs > 0, "env.num_envs", "> 0", config.env.num_envs)
    check(config.env.replan_steps > 0, "env.replan_steps", "> 0", config.env.replan_steps)
    check(
        0 < config.env.replan_steps <= config.model.chunk_size,
        "env.replan_steps",
        f"in [1, model.chunk_size={config.model.chunk_size}]",
        config.env.replan_steps,
    )
    check(config.train.iterations > 0, "train.iterations", "> 0", config.train.iterations)
    check(
        config.train.mixed_precision in (None, "no", "bf16", "fp16"),
        "train.mixed_precision",
        "null, 'no', 'bf16' or 'fp16'",
        config.train.mixed_precision,
    )
    check(
        set(config.tracking.report_to) <= {"tensorboard", "wandb"},
        "tracking.report_to",
        "a subset of [tensorboard, wandb]",
        list(config.tracking.report_to),
    )


# --- RIPT on the simulated soft arm (scripts/ript_soft_arm.py) -----------------------------------


@dataclass
class SoftArmRLModelConfig:
    pretrained: str = "outputs/ript_soft_arm/bc_few20/checkpoints/last/pretrained_model"  # a graph pi0 (BC)
    guidance_weight: float = 1.0  # w at sampling; the flag embedding starts at zero (acts as the BC policy)


@dataclass
class SoftArmRLEnvConfig:
    num_envs: int = 16  # simulators stepped together, one batched policy call per round
    replan_steps: int = 8  # actions executed from each 16-step chunk
    max_steps: int = 40  # control steps per episode (10 Hz)
    image_size: int = 224
    train_states: int = 512  # the pool of training task seeds (the RL "init states")
    eval_episodes: int = 100  # held-out seeds of eval_soft_arm.py


@dataclass
class SoftArmRIPTConfig:
    output_dir: str = "outputs/ript_soft_arm/rl"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one RL run each
    iterations: int = 15
    eval_every: int = 5  # held-out success every N iterations (and at 0 and the end)
    model: SoftArmRLModelConfig = field(default_factory=SoftArmRLModelConfig)
    env: SoftArmRLEnvConfig = field(default_factory=SoftArmRLEnvConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def validate_soft_arm_config(config: Any) -> None:
    """Range checks of a `SoftArmRIPTConfig`; a `ConfigError` names the key."""
    validate_rl(config.rl)
    validate_optim(config.optim)
    check(len(config.seeds) > 0, "seeds", "a non-empty list", list(config.seeds))
    check(config.iterations > 0, "iterations", "> 0", config.iterations)
    check(config.eval_every > 0, "eval_every", "> 0", config.eval_every)
    for key in ("num_envs", "replan_steps", "max_steps", "image_size", "eval_episodes"):
        check(config.env[key] > 0, f"env.{key}", "> 0", config.env[key])
    check(
        config.env.train_states >= config.rl.states_per_draw,
        "env.train_states",
        f">= rl.states_per_draw ({config.rl.states_per_draw})",
        config.env.train_states,
    )
    check(config.model.guidance_weight >= 0, "model.guidance_weight", ">= 0", config.model.guidance_weight)
