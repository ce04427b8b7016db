"""RIPT: RL post-training of pi0 in LIBERO with Hugging Face Accelerate (the final stage script).

Each iteration: draw init states (a DataLoader that accelerate shards across ranks), roll out K
episodes from each in vectorized LIBERO envs, keep the groups whose outcomes differ (dynamic
sampling), give every rollout its leave-one-out advantage, and update the flag-conditioned pi0
with the CFG-RL objective (or the advantage-filtered baseline) for a few epochs over the rollout
windows. Statistics are reduced across ranks; evaluation runs on fixed init states.

    python scripts/train_ript_pi0.py --config_path configs/debug_train_pi0.yaml
    accelerate launch --config_file accelerate_configs/8gpu.yaml scripts/train_ript_pi0.py \
        --config_path configs/train_pi0_cfg_rl.yaml model.pretrained=/path/to/pi0_libero
    ... --resume                     # continue the newest checkpoint of output_dir
"""

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
from omegaconf import OmegaConf
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import GracefulStop, resolve_resume, save_checkpoint  # noqa: E402
from lib.config import ConfigError, check, load_config, to_flat_dict  # noqa: E402
from lib.libero import (  # noqa: E402
    ACTION_DIM,
    AGENTVIEW_KEY,
    STATE_DIM,
    STATE_KEY,
    WRIST_KEY,
    LiberoInitStateDataset,
    VectorLiberoRollout,
    collate_fn_state,
    make_policy_fn,
)
from lib.pi0 import (  # noqa: E402
    MODEL_SIZES,
    count_parameters,
    load_pi0_processors,
    load_tokenizer,
    make_pi0_policy,
    make_pi0_processors,
    saved_model_size,
    seeded_noise_and_time,
)
from lib.ript import (  # noqa: E402
    OBJECTIVES,
    PI0CFGConfig,
    PI0CFGPolicy,
    StateOutcomeHistory,
    collect_informative_groups,
    init_state_key,
    minibatch_order,
    rollout_groups,
    window_batch,
    windows_with_advantages,
)
from lib.run_logging import append_metrics, init_trackers, plot_metrics, setup_logging  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Config: defaults here, overridden by the YAML file, then by `key=value` arguments.
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


def validate_config(config) -> None:
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", type=Path, help="YAML config (configs/train_pi0_cfg_rl.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", help="'latest' (default) or a checkpoint dir")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.rollouts_per_state=8")
    return parser.parse_args()


class TrainingProgress:
    """Iterations done and init-state batches drawn (the sampler position), for resume."""

    def __init__(self) -> None:
        self.iteration = 0
        self.draws = 0

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.draws = state["iteration"], state["draws"]


def main() -> int:
    args = parse_args()
    try:
        config = load_config(RIPTConfig, args.config_path, args.overrides)
        validate_config(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------------------------------
    # Accelerator (see train_soft_arm.py for why `cpu=`).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with=list(config.tracking.report_to) or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    logger = setup_logging(output_dir, rank, accelerator.is_main_process)
    logger.info(
        "processes: %d (%s), device: %s, mixed precision: %s",
        world,
        accelerator.distributed_type,
        accelerator.device,
        accelerator.mixed_precision,
    )
    set_seed(config.seed)

    # ------------------------------------------------------------------------------------------
    # Init states: every (task, init state) of the suite, shuffled and sharded across ranks.
    init_states = LiberoInitStateDataset(config.env.benchmark, config.env.task_names)
    state_loader = torch.utils.data.DataLoader(
        init_states, batch_size=config.rl.states_per_draw, shuffle=True, drop_last=True, collate_fn=collate_fn_state
    )
    eval_states = LiberoInitStateDataset(config.env.benchmark, config.env.task_names, config.train.eval_init_indices)
    logger.info(
        "%s: %d init states for training, %d fixed ones for evaluation",
        config.env.benchmark,
        len(init_states),
        len(eval_states),
    )

    # ------------------------------------------------------------------------------------------
    # Policy: flag-conditioned pi0, and its processors (a checkpoint's own, or identity
    # normalization for a fresh model: there is no dataset to take statistics from).
    image_shape = (3, config.model.image_size, config.model.image_size)
    pretrained = config.model.pretrained
    policy_config = PI0CFGConfig(
        model_size=pretrained if pretrained in MODEL_SIZES else saved_model_size(pretrained),
        dtype=config.model.dtype,
        chunk_size=config.model.chunk_size,
        n_action_steps=config.model.chunk_size,
        num_inference_steps=config.model.num_inference_steps,
        image_resolution=(config.model.image_size, config.model.image_size),
        guidance_weight=config.model.guidance_weight,
        device=accelerator.device.type,
        input_features={
            AGENTVIEW_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=image_shape),
            WRIST_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=image_shape),
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    has_processors = pretrained not in MODEL_SIZES and (Path(pretrained) / "policy_preprocessor.json").is_file()
    if not has_processors:
        policy_config.normalization_mapping = {k: NormalizationMode.IDENTITY for k in ("VISUAL", "STATE", "ACTION")}
    pretrained_kwargs = {} if pretrained in MODEL_SIZES else {"strict": False}  # a base pi0 has no flag embedding
    policy = make_pi0_policy(pretrained, policy_config, PI0CFGPolicy, **pretrained_kwargs)
    tokenizer = load_tokenizer(config.model.tokenizer)
    if has_processors:
        preprocessor, postprocessor = load_pi0_processors(pretrained, tokenizer)
    else:
        preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer)
    logger.info(
        "policy: %s pi0 (flag-conditioned), %.2f M parameters", policy_config.model_size, count_parameters(policy) / 1e6
    )

    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        fused=torch.cuda.is_available(),
    )
    policy, optimizer, state_loader = accelerator.prepare(policy, optimizer, state_loader)
    progress = TrainingProgress()
    history = StateOutcomeHistory(skip_after=config.rl.skip_after, skip_for=config.rl.skip_for)
    accelerator.register_for_checkpointing(progress, history)
    checkpoint = resolve_resume(output_dir, args.resume or config.resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / "training_state"))
        logger.info("resumed from %s at iteration %d", checkpoint, progress.iteration)

    def draw_state_batches():
        """Init-state batches forever; resumes at `progress.draws` (seedable sampler: the order
        is a function of seed and epoch)."""
        while True:
            epoch, skip = divmod(progress.draws, len(state_loader))
            loader = accelerator.skip_first_batches(state_loader, skip) if skip else state_loader
            loader.set_epoch(epoch)
            for batch in loader:
                progress.draws += 1
                batch = {key: value.cpu() if torch.is_tensor(value) else value for key, value in batch.items()}
                yield [{key: batch[key][i] for key in batch} for i in range(len(batch["instruction"]))]

    state_batches = draw_state_batches()
    unwrapped = accelerator.unwrap_model(policy)

    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)

    def save(iteration: int) -> Path:
        # Each rank saw other init states: merge the outcome histories so every rank saves them all.
        merged = StateOutcomeHistory(history.skip_after, history.skip_for)
        for state in gather_object([history.state_dict()]):
            other = StateOutcomeHistory()
            other.load_state_dict(state)
            merged.solved_streak.update(other.solved_streak)
            merged.skips_left.update(other.skips_left)
        history.load_state_dict(merged.state_dict())
        state_dict = accelerator.get_state_dict(policy, unwrap=True)

        def save_model(directory: Path) -> None:
            unwrapped.save_pretrained(directory, state_dict=state_dict)
            preprocessor.save_pretrained(directory)
            postprocessor.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

        path = save_checkpoint(accelerator, output_dir, iteration, save_model, config.train.keep_last)
        logger.info("saved checkpoint %s", path)
        return path

    def reduce_sum(*values: float) -> list[float]:
        return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum").tolist()

    # ------------------------------------------------------------------------------------------
    # Trackers, simulators and the loop.
    init_trackers(
        accelerator,
        output_dir,
        config.tracking.project,
        config.tracking.run_name,
        to_flat_dict(config),
        config.tracking.wandb_mode,
    )
    if accelerator.is_main_process:
        OmegaConf.save(config, output_dir / "config.yaml")
    metrics_file = output_dir / "metrics.jsonl"
    vector_env = VectorLiberoRollout(
        config.env.benchmark,
        config.env.num_envs,
        config.env.camera_size,
        config.env.max_steps,
        config.env.replan_steps,
        seed=config.seed + 1000 * rank,
    )
    stop = GracefulStop()
    k = config.rl.rollouts_per_state
    checkpoint_iteration = progress.iteration if checkpoint is not None else None
    bar = tqdm(
        total=config.train.iterations,
        initial=progress.iteration,
        desc="iterations",
        disable=not accelerator.is_main_process,
    )
    all_results = []  # every episode rolled out in the current iteration

    try:
        while progress.iteration < config.train.iterations:
            iteration = progress.iteration + 1

            # 1. Rollouts with dynamic sampling.
            rollout_start = time.perf_counter()
            all_results.clear()
            unwrapped.eval()
            kept, stats = collect_informative_groups(
                lambda: next(state_batches),
                lambda states: rollout_groups(vector_env, policy_fn, states, k, all_results),
                init_state_key,
                history,
                config.rl.target_groups,
                config.rl.max_draw_rounds,
            )
            rollout_time = time.perf_counter() - rollout_start

            # 2. Leave-one-out advantage of every kept rollout, given to each of its windows.
            windows, advantages = windows_with_advantages(kept)

            # 3. Update. Every rank must run the same number of steps (DDP): the rank with the
            # most windows sets it, the others cycle through theirs; no update if a rank has none.
            update_start = time.perf_counter()
            counts = accelerator.gather(torch.tensor([len(windows)], device=accelerator.device))
            losses = []
            if int(counts.min()) > 0:
                unwrapped.train()
                steps = config.rl.update_epochs * math.ceil(int(counts.max()) / config.rl.minibatch_size)
                order_seed = config.seed * 7919 + iteration * 31 + rank
                for step, picked in enumerate(
                    minibatch_order(len(windows), steps, config.rl.minibatch_size, order_seed)
                ):
                    batch, batch_advantages = window_batch(windows, advantages, picked, config.model.chunk_size)
                    batch = preprocessor(batch)
                    noise, flow_time = seeded_noise_and_time(
                        unwrapped.model,
                        len(picked),
                        (config.seed * 1_000_003 + iteration) * 10_007 + step * world + rank,
                        accelerator.device,
                    )
                    with accelerator.autocast():
                        loss, _ = policy(
                            batch,
                            batch_advantages.to(accelerator.device),
                            noise,
                            flow_time,
                            objective=config.rl.objective,
                            alpha=config.rl.alpha,
                        )
                    accelerator.backward(loss)
                    accelerator.clip_grad_norm_(policy.parameters(), config.optim.grad_clip_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
            update_time = time.perf_counter() - update_start

            # 4. Statistics over all ranks.
            successes, episodes, env_steps, positive, adv_sum, adv_sq, n_adv, groups, dropped_s, dropped_f, skipped = (
                reduce_sum(
                    sum(r.success for r in all_results),
                    len(all_results),
                    sum(r.length for r in all_results),
                    sum(a > 0 for a in advantages),
                    sum(advantages),
                    sum(a * a for a in advantages),
                    len(advantages),
                    len(kept),
                    stats.dropped_all_success,
                    stats.dropped_all_failure,
                    stats.skipped_states,
                )
            )
            adv_mean = adv_sum / max(n_adv, 1)
            metrics = {
                "rollout/success_rate": successes / max(episodes, 1),
                "rollout/episodes": episodes,
                "rollout/env_steps_per_s": env_steps / max(rollout_time, 1e-9),
                "rollout/time_s": rollout_time,
                "rollout/worker_restarts": vector_env.worker_restarts,
                "sampling/groups_kept": groups,
                "sampling/dropped_all_success": dropped_s,
                "sampling/dropped_all_failure": dropped_f,
                "sampling/skipped_states": skipped,
                "advantage/mean": adv_mean,
                "advantage/std": math.sqrt(max(adv_sq / max(n_adv, 1) - adv_mean**2, 0.0)),
                "advantage/positive_fraction": positive / max(n_adv, 1),
                "update/time_s": update_time,
                "update/steps": len(losses),
            }
            if losses:
                metrics["update/loss"] = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            progress.iteration = iteration

            # 5. Evaluation on the fixed init states (each rank takes its share).
            if iteration % config.train.eval_every == 0 or iteration == config.train.iterations:
                unwrapped.eval()
                shard = [eval_states[i] for i in range(rank, len(eval_states), world)]
                results = vector_env.run(shard, policy_fn) if shard else []
                eval_successes, eval_episodes = reduce_sum(sum(r.success for r in results), len(results))
                metrics["eval/success_rate"] = eval_successes / max(eval_episodes, 1)

            accelerator.log(metrics, step=iteration)
            if accelerator.is_main_process:
                append_metrics(metrics_file, iteration, metrics)
            logger.info(
                "iteration %d: success %.3f, %d groups kept (dropped %d solved / %d failed), %d updates, "
                "rollout %.1f s (%.1f env steps/s), update %.1f s",
                iteration,
                metrics["rollout/success_rate"],
                groups,
                dropped_s,
                dropped_f,
                len(losses),
                rollout_time,
                metrics["rollout/env_steps_per_s"],
                update_time,
            )
            bar.update(1)
            bar.set_postfix(success=f"{metrics['rollout/success_rate']:.2f}")

            stopped = stop.should_stop(accelerator)
            if iteration % config.train.save_every == 0 or iteration == config.train.iterations or stopped:
                checkpoint = save(iteration)
                checkpoint_iteration = iteration
            if stopped:
                logger.info("signal %s received: stopped at iteration %d after saving", stop.received, iteration)
                break
    finally:
        bar.close()
        vector_env.close()

    # ------------------------------------------------------------------------------------------
    # Summary and an orderly shutdown.
    if accelerator.is_main_process:
        if checkpoint_iteration is not None:
            print(f"checkpoint: {checkpoint / 'pretrained_model'}")
        if metrics_file.exists():
            plot_metrics(
                metrics_file, output_dir / "success.png", ("rollout/success_rate", "eval/success_rate"), log_scale=False
            )
    accelerator.wait_for_everyone()
    policy = optimizer = state_loader = unwrapped = None  # drop the last references before free_memory
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
