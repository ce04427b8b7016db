"""The RIPT config schema shared by the stage scripts 09-13 and `train_ript_pi0.py`: defaults and
types here, values from `configs/*.yaml` and `key=value` overrides (lib/config.py)."""

from dataclasses import dataclass, field
from typing import Any, Optional

from lib.config import check
from lib.ript import OBJECTIVES


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
    objective: str = "cfg_rl"  # cfg_rl | advantage_filtered
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


def validate_config(config: Any) -> None:
    """Range checks the types cannot express; a `ConfigError` names the key."""
    check(
        config.rl.rollouts_per_state >= 2, "rl.rollouts_per_state", ">= 2 (leave-one-out)", config.rl.rollouts_per_state
    )
    check(config.rl.objective in OBJECTIVES, "rl.objective", f"one of {list(OBJECTIVES)}", config.rl.objective)
    for key in ("states_per_draw", "target_groups", "max_draw_rounds", "update_epochs", "minibatch_size"):
        check(config.rl[key] > 0, f"rl.{key}", "> 0", config.rl[key])
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
