"""Every config schema of the project: defaults and types here, values from `configs/*.yaml` and
`key=value` overrides (lib/run/config.py), range checks in the `validate_*` functions.

- `RIPTConfig`: RIPT on LIBERO (`train_ript_pi0.py`, the stage scripts 09-13);
- `SoftArmRIPTConfig`: RIPT on the simulated soft arm (`ript_soft_arm.py`);
- `SoftArmTrainConfig`: supervised fine-tuning of graph pi0 (`train_soft_arm.py`).
They share the common sections: model source, optimizer, checkpointing, tracking.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from lib.run.config import check

# The update objectives (lib/rl/objectives.py): the original's CFG-RL, the advantage-filtered baseline,
# behaviour cloning on every window (reward ignored: the no-reward control), and a PPO update on the
# exact log-probabilities of Flow-Noise sampling (stochastic denoising steps, as in piRL).
OBJECTIVES = ("cfg_rl", "advantage_filtered", "behavior_cloning", "flow_noise")
# Where an update's advantages come from: the original's leave-one-out over each group's K rollouts (one
# per rollout), or a critic fitted on the iteration's rollouts (one per window, lib/rl/critic.py).
ADVANTAGES = ("leave_one_out", "critic")


# --- Sections every trainer shares ------------------------------------------------------------------


@dataclass
class PolicySourceConfig:
    pretrained: str = "tiny"  # "tiny" / "small" / "full" (random init), or a local path / hub id of a pi0 checkpoint
    tokenizer: str = "artifacts/tokenizer"  # local dir or hub id (google/paligemma-3b-pt-224)
    dtype: str = "float32"  # storage dtype of the VLM and expert weights: float32 or bfloat16


@dataclass
class FinetuneModeConfig(PolicySourceConfig):
    """LeRobot's own pi0 switches for what trains and what memory it takes (docs/training.md "Fine-tuning
    modes and their memory")."""

    gradient_checkpointing: bool = False
    freeze_vision_encoder: bool = False  # SigLIP frozen, run without autograd
    train_expert_only: bool = False  # the whole PaliGemma frozen; the action expert and projections train
    # torch.compile of pi0's forward and sampling (LeRobot's compile_model); the first steps compile.
    compile: bool = False
    compile_mode: str = "default"  # or "reduce-overhead", "max-autotune" (LeRobot's default), ...


@dataclass
class LoraModeConfig(FinetuneModeConfig):
    """The fine-tuning modes plus LoRA (the trainers that wrap their policy: train_soft_arm.py,
    train_ript_pi0.py)."""

    # > 0: LoRA adapters of this rank (peft, LeRobot's pi0 targets) train, the pretrained weights
    # stay frozen; parts new on the source (graph encoder, flag embedding) train fully (lib/policies/lora.py).
    lora_rank: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


@dataclass
class RLOptimConfig(OptimConfig):
    """The RL trainers' optimizer: the learning rate is set per RL iteration."""

    warmup_iterations: int = 0  # linear warm-up over the first N iterations
    decay_lr: Optional[float] = None  # None: constant after the warm-up; else cosine decay to it at the last iteration


@dataclass
class CheckpointingConfig:
    mixed_precision: Optional[str] = None  # None: the launcher's; or "no", "bf16", "fp16"
    save_every: int = 10
    keep_last: int = 3
    # A collective that waits longer fails the run (a lost node or rank ends the others instead of
    # hanging them; gloo's own default is 30 minutes). Above the longest wait of one rank on another:
    # a full-size checkpoint written by the main process, an evaluation.
    collective_timeout_s: float = 900.0


@dataclass
class TrackingConfig:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])
    project: str = "pi0-ript"
    run_name: str = "ript"
    wandb_mode: str = "offline"  # "online" to sync to wandb


def validate_source(model: Any) -> None:
    check(model.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'", model.dtype)


def validate_finetune_modes(model: Any) -> None:
    """Ranges of a `FinetuneModeConfig` section."""
    validate_source(model)
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    check(model.compile_mode in modes, "model.compile_mode", f"one of {modes}", model.compile_mode)


def validate_lora_modes(model: Any) -> None:
    """Ranges of a `LoraModeConfig` section beyond `validate_finetune_modes`'."""
    check(model.lora_rank >= 0, "model.lora_rank", ">= 0", model.lora_rank)
    if model.lora_rank:
        from lib.policies.sizes import MODEL_SIZES

        check(
            not (model.train_expert_only or model.freeze_vision_encoder),
            "model.lora_rank",
            "0 with model.train_expert_only or model.freeze_vision_encoder (LoRA freezes every pretrained weight)",
            model.lora_rank,
        )
        check(
            model.pretrained not in MODEL_SIZES,
            "model.lora_rank",
            "0 when model.pretrained is a fresh size (adapters fine-tune pretrained weights)",
            model.lora_rank,
        )


def validate_optim(optim: Any) -> None:
    """Ranges of an `optim` section."""
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


def validate_rl_optim(optim: Any) -> None:
    """Ranges of an `RLOptimConfig` section."""
    validate_optim(optim)
    check(optim.warmup_iterations >= 0, "optim.warmup_iterations", ">= 0", optim.warmup_iterations)
    check(
        optim.decay_lr is None or 0 <= optim.decay_lr <= optim.lr,
        "optim.decay_lr",
        f"null or in [0, optim.lr={optim.lr}]",
        optim.decay_lr,
    )


def validate_checkpointing(train: Any) -> None:
    check(
        train.mixed_precision in (None, "no", "bf16", "fp16"),
        "train.mixed_precision",
        "null, 'no', 'bf16' or 'fp16'",
        train.mixed_precision,
    )
    check(train.save_every > 0, "train.save_every", "> 0", train.save_every)
    check(train.keep_last >= 1, "train.keep_last", ">= 1", train.keep_last)
    check(train.collective_timeout_s > 0, "train.collective_timeout_s", "> 0", train.collective_timeout_s)


def validate_tracking(tracking: Any) -> None:
    check(
        set(tracking.report_to) <= {"tensorboard", "wandb"},
        "tracking.report_to",
        "a subset of [tensorboard, wandb]",
        list(tracking.report_to),
    )
    check(
        tracking.wandb_mode in ("offline", "online", "disabled"),
        "tracking.wandb_mode",
        "offline, online or disabled",
        tracking.wandb_mode,
    )


# --- RIPT on LIBERO ---------------------------------------------------------------------------------


@dataclass
class ModelConfig(FinetuneModeConfig):
    chunk_size: int = 50
    num_inference_steps: int = 10
    image_size: int = 224
    guidance_weight: float = 1.0  # w in v = v_null + w (v_cond - v_null); 1 = plain conditional


# The LIBERO suites (their step limits are lib.envs.libero.worker.MAX_STEPS).
LIBERO_BENCHMARKS = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


@dataclass
class EnvConfig:
    benchmark: str = "libero_spatial"
    task_names: Optional[list[str]] = None  # None: every task of the suite
    num_envs: int = 8  # simulator processes per rank
    camera_size: int = 128
    max_steps: Optional[int] = None  # None: the suite's standard limit
    replan_steps: int = 5  # actions executed from each chunk before the next policy call
    settle_steps: int = 10  # no-op steps after each reset while objects settle (LIBERO's protocol: 10)


@dataclass
class RLConfig:
    rollouts_per_state: int = 4  # K
    states_per_draw: int = 4  # init states drawn per rank at a time
    target_groups: int = 4  # informative groups wanted per rank and iteration
    max_draw_rounds: int = 4  # dynamic-sampling draws per iteration at most
    skip_after: int = 3  # a state solved K/K this many times in a row ...
    skip_for: int = 5  # ... is skipped for this many draws
    objective: str = "cfg_rl"  # cfg_rl | advantage_filtered | behavior_cloning | flow_noise
    alpha: float = 0.1  # weight of the unconditional branch in cfg_rl
    flow_noise_std: float = 0.1  # flow_noise: std of the noise added at every denoising step (normalized actions)
    clip_epsilon: float = 0.2  # flow_noise: PPO's ratio clip
    update_epochs: int = 4
    minibatch_size: int = 16
    gradient_accumulation_steps: int = 1  # minibatches per optimizer step (the last of an iteration may hold fewer)
    max_nonfinite_steps: int = 10  # update steps with a non-finite gradient are skipped; this many in a row stop
    # Past the plateau (docs/ript.md "Past the plateau"); every default is the original's RIPT.
    advantage: str = "leave_one_out"  # leave_one_out | critic (per-window advantages; failed groups are kept)
    positive_quantile: float = 0.3  # critic: the top fraction of an iteration's windows labelled positive
    critic_ridge: float = 1000.0  # critic: the ridge penalty of its linear fit (on standardised features)
    explore_std: float = 0.0  # > 0: a group whose K rollouts all failed is rolled out again with SDE noise
    max_episodes: Optional[int] = None  # rollouts per rank and iteration at most (None: the draw rounds bound it)
    demo_dataset: Optional[str] = None  # a LeRobotDataset of demonstrations, forced positives in every update
    demos_per_minibatch: int = 4  # demonstration frames added to each update minibatch


@dataclass
class TrainConfig(CheckpointingConfig):
    iterations: int = 100
    eval_every: int = 10
    eval_init_indices: list[int] = field(default_factory=lambda: [0, 1])  # per task, fixed


@dataclass
class RIPTTrackingConfig(TrackingConfig):
    video_every: int = 10  # a rollout video every N iterations (0: none), from stage 11 on


@dataclass
class RIPTConfig:
    output_dir: str = "outputs/ript"
    seed: int = 42
    resume: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: RLOptimConfig = field(default_factory=RLOptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: RIPTTrackingConfig = field(default_factory=RIPTTrackingConfig)


@dataclass
class TrainRIPTModelConfig(ModelConfig, LoraModeConfig):
    pass


@dataclass
class TrainRIPTConfig(RIPTConfig):
    """train_ript_pi0.py's config: the stages' plus LoRA (`model.lora_rank`)."""

    model: TrainRIPTModelConfig = field(default_factory=TrainRIPTModelConfig)


def validate_train_ript_config(config: Any) -> None:
    """`validate_config` and the LoRA key."""
    validate_config(config)
    validate_lora_modes(config.model)


def validate_rl(rl: Any) -> None:
    """Ranges of the `rl` section (shared by the LIBERO and soft-arm configs)."""
    check(rl.rollouts_per_state >= 2, "rl.rollouts_per_state", ">= 2 (leave-one-out)", rl.rollouts_per_state)
    check(rl.objective in OBJECTIVES, "rl.objective", f"one of {list(OBJECTIVES)}", rl.objective)
    for key in (
        "states_per_draw",
        "target_groups",
        "max_draw_rounds",
        "update_epochs",
        "minibatch_size",
        "gradient_accumulation_steps",
        "max_nonfinite_steps",
    ):
        check(rl[key] > 0, f"rl.{key}", "> 0", rl[key])
    check(rl.skip_after > 0, "rl.skip_after", "> 0", rl.skip_after)
    check(rl.skip_for >= 0, "rl.skip_for", ">= 0", rl.skip_for)
    check(rl.alpha >= 0, "rl.alpha", ">= 0", rl.alpha)
    check(rl.flow_noise_std > 0, "rl.flow_noise_std", "> 0", rl.flow_noise_std)
    check(0 < rl.clip_epsilon < 1, "rl.clip_epsilon", "in (0, 1)", rl.clip_epsilon)
    check(rl.advantage in ADVANTAGES, "rl.advantage", f"one of {list(ADVANTAGES)}", rl.advantage)
    check(0 < rl.positive_quantile < 1, "rl.positive_quantile", "in (0, 1)", rl.positive_quantile)
    check(rl.critic_ridge > 0, "rl.critic_ridge", "> 0", rl.critic_ridge)
    check(rl.explore_std >= 0, "rl.explore_std", ">= 0", rl.explore_std)
    check(
        rl.explore_std == 0 or rl.objective != "flow_noise",
        "rl.explore_std",
        "0 with rl.objective=flow_noise (its rollouts already sample with rl.flow_noise_std)",
        rl.explore_std,
    )
    if rl.max_episodes is not None:
        check(
            rl.max_episodes >= rl.rollouts_per_state,
            "rl.max_episodes",
            f">= rl.rollouts_per_state ({rl.rollouts_per_state}) or null",
            rl.max_episodes,
        )
    check(rl.demos_per_minibatch > 0, "rl.demos_per_minibatch", "> 0", rl.demos_per_minibatch)
    check(
        rl.demo_dataset is None or rl.objective != "flow_noise",
        "rl.demo_dataset",
        "null with rl.objective=flow_noise (a demonstration has no sampling chain to score)",
        rl.demo_dataset,
    )


def validate_config(config: Any) -> None:
    """Range checks the types cannot express; a `ConfigError` names the key."""
    validate_rl(config.rl)
    validate_rl_optim(config.optim)
    check(config.env.num_envs > 0, "env.num_envs", "> 0", config.env.num_envs)
    check(config.env.replan_steps > 0, "env.replan_steps", "> 0", config.env.replan_steps)
    check(config.env.settle_steps >= 0, "env.settle_steps", ">= 0", config.env.settle_steps)
    check(
        0 < config.env.replan_steps <= config.model.chunk_size,
        "env.replan_steps",
        f"in [1, model.chunk_size={config.model.chunk_size}]",
        config.env.replan_steps,
    )
    check(
        config.env.benchmark in LIBERO_BENCHMARKS,
        "env.benchmark",
        f"one of {list(LIBERO_BENCHMARKS)}",
        config.env.benchmark,
    )
    check(config.train.iterations > 0, "train.iterations", "> 0", config.train.iterations)
    check(config.train.eval_every > 0, "train.eval_every", "> 0", config.train.eval_every)
    check(config.tracking.video_every >= 0, "tracking.video_every", ">= 0", config.tracking.video_every)
    validate_finetune_modes(config.model)
    validate_checkpointing(config.train)
    validate_tracking(config.tracking)


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
    train_states: int = 512  # the pool of training tasks (the RL "init states")
    eval_episodes: int = 100  # held-out tasks of eval_soft_arm.py


@dataclass
class SoftArmRLConfig(RLConfig):
    # A failed episode scores -distance_penalty x (final tip distance / success radius) instead of 0,
    # so groups that all fail still rank their episodes (0: the original's success-only reward).
    distance_penalty: float = 0.0


@dataclass
class SoftArmRIPTConfig:
    output_dir: str = "outputs/ript_soft_arm/rl"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one RL run each
    iterations: int = 15
    eval_every: int = 5  # held-out success every N iterations (and at 0 and the end)
    save_every: int = 5  # a checkpoint of each run every N iterations (and at the end)
    keep_last: int = 2  # checkpoints kept per seed
    model: SoftArmRLModelConfig = field(default_factory=SoftArmRLModelConfig)
    env: SoftArmRLEnvConfig = field(default_factory=SoftArmRLEnvConfig)
    rl: SoftArmRLConfig = field(default_factory=SoftArmRLConfig)
    optim: RLOptimConfig = field(default_factory=RLOptimConfig)


def validate_soft_arm_ript_config(config: Any) -> None:
    """Range checks of a `SoftArmRIPTConfig`; a `ConfigError` names the key."""
    validate_rl(config.rl)
    validate_rl_optim(config.optim)
    check(len(config.seeds) > 0, "seeds", "a non-empty list", list(config.seeds))
    check(config.iterations > 0, "iterations", "> 0", config.iterations)
    check(config.eval_every > 0, "eval_every", "> 0", config.eval_every)
    check(config.save_every > 0, "save_every", "> 0", config.save_every)
    check(config.keep_last >= 1, "keep_last", ">= 1", config.keep_last)
    for key in ("num_envs", "replan_steps", "max_steps", "image_size", "eval_episodes"):
        check(config.env[key] > 0, f"env.{key}", "> 0", config.env[key])
    check(
        config.env.train_states >= config.rl.states_per_draw,
        "env.train_states",
        f">= rl.states_per_draw ({config.rl.states_per_draw})",
        config.env.train_states,
    )
    check(config.model.guidance_weight >= 0, "model.guidance_weight", ">= 0", config.model.guidance_weight)
    check(config.rl.distance_penalty >= 0, "rl.distance_penalty", ">= 0", config.rl.distance_penalty)


# --- Supervised fine-tuning of graph pi0 on soft-arm episodes (scripts/train_soft_arm.py) ----------


@dataclass
class SoftArmModelConfig(LoraModeConfig):
    use_graph: bool = True


@dataclass
class SoftArmDataConfig:
    root: str = "artifacts/soft_arm_lerobot"  # a LeRobotDataset from data_prep/soft_arm_to_lerobot.py
    val_fraction: float = 0.1  # fraction of episodes held out for validation
    batch_size: int = 8  # per process and micro-step
    num_workers: int = 2
    chunk_size: int = 16
    image_size: int = 224


@dataclass
class ScheduledOptimConfig(OptimConfig):
    lr: float = 2.5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    decay_lr: float = 2.5e-6  # cosine decay ends here at train.steps


@dataclass
class SoftArmLoopConfig(CheckpointingConfig):
    steps: int = 30_000  # optimizer steps
    gradient_accumulation_steps: int = 1
    max_nonfinite_steps: int = 10  # skipped steps (non-finite gradient) in a row before the run stops
    log_every: int = 10
    val_every: int = 500
    val_batches: int = 20
    save_every: int = 2000


@dataclass
class SoftArmTrackingConfig(TrackingConfig):
    project: str = "pi0-soft-arm"
    run_name: str = "soft_arm"


@dataclass
class HubConfig:
    repo_id: Optional[str] = None  # owner/name: the final checkpoint is pushed there (needs the network)
    private: bool = False


@dataclass
class SoftArmTrainConfig:
    output_dir: str = "outputs/soft_arm"
    seed: int = 42
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    model: SoftArmModelConfig = field(default_factory=SoftArmModelConfig)
    data: SoftArmDataConfig = field(default_factory=SoftArmDataConfig)
    optim: ScheduledOptimConfig = field(default_factory=ScheduledOptimConfig)
    train: SoftArmLoopConfig = field(default_factory=SoftArmLoopConfig)
    tracking: SoftArmTrackingConfig = field(default_factory=SoftArmTrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def validate_soft_arm_train_config(config: Any) -> None:
    """Range checks of a `SoftArmTrainConfig`; a `ConfigError` names the key."""
    check(config.data.batch_size > 0, "data.batch_size", "> 0", config.data.batch_size)
    check(0 <= config.data.val_fraction < 1, "data.val_fraction", "in [0, 1)", config.data.val_fraction)
    check(config.data.chunk_size > 0, "data.chunk_size", "> 0", config.data.chunk_size)
    check(config.data.image_size > 0, "data.image_size", "> 0", config.data.image_size)
    check(config.data.num_workers >= 0, "data.num_workers", ">= 0", config.data.num_workers)
    check(config.train.steps > 0, "train.steps", "> 0", config.train.steps)
    check(
        config.train.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        ">= 1",
        config.train.gradient_accumulation_steps,
    )
    for key in ("log_every", "val_every", "val_batches", "max_nonfinite_steps"):
        check(config.train[key] > 0, f"train.{key}", "> 0", config.train[key])
    validate_finetune_modes(config.model)
    validate_lora_modes(config.model)
    validate_optim(config.optim)
    check(config.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", config.optim.warmup_steps)
    check(
        0 <= config.optim.decay_lr <= config.optim.lr,
        "optim.decay_lr",
        f"in [0, optim.lr={config.optim.lr}]",
        config.optim.decay_lr,
    )
    validate_checkpointing(config.train)
    validate_tracking(config.tracking)
