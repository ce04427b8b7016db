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
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.checkpoint import GracefulStop, resolve_resume, save_policy_checkpoint  # noqa: E402
from lib.config import ConfigError, load_config, to_flat_dict  # noqa: E402
from lib.libero import (  # noqa: E402
    LiberoInitStateDataset,
    VectorLiberoRollout,
    collate_fn_state,
    split_state_batch,
)
from lib.pi0 import (  # noqa: E402
    count_parameters,
    seeded_noise_and_time,
)
from lib.ript import (  # noqa: E402
    RIPTProgress,
    StateOutcomeHistory,
    collect_informative_groups,
    init_state_key,
    make_ript_policy,
    minibatch_order,
    rollout_groups,
    save_rollout_video,
    window_batch,
    windows_with_advantages,
)
from lib.ript_config import RIPTConfig, validate_config  # noqa: E402
from lib.rollout import make_policy_fn  # noqa: E402
from lib.run_logging import append_metrics, init_trackers, plot_metrics, setup_logging  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", type=Path, help="YAML config (configs/train_pi0_cfg_rl.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", help="'latest' (default) or a checkpoint dir")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.rollouts_per_state=8")
    return parser.parse_args()


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
    policy, preprocessor, postprocessor, tokenizer = make_ript_policy(config.model, accelerator.device.type)
    logger.info(
        "policy: %s pi0 (flag-conditioned), %.2f M parameters", policy.config.model_size, count_parameters(policy) / 1e6
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
    progress = RIPTProgress()
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
                yield split_state_batch(batch)

    state_batches = draw_state_batches()
    unwrapped = accelerator.unwrap_model(policy)

    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)

    def save(iteration: int) -> Path:
        # Each rank saw other init states: merge the outcome histories so the checkpoint has them all.
        history.merge(gather_object([history.state_dict()]))
        path = save_policy_checkpoint(
            accelerator, output_dir, iteration, policy, [preprocessor, postprocessor, tokenizer], config.train.keep_last
        )
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
            record_video = (
                accelerator.is_main_process
                and config.tracking.video_every > 0
                and (iteration % config.tracking.video_every == 0)
            )
            unwrapped.eval()
            kept, stats = collect_informative_groups(
                lambda: next(state_batches),
                lambda states, record=record_video: rollout_groups(
                    vector_env, policy_fn, states, k, all_results, record_first=record
                ),
                init_state_key,
                history,
                config.rl.target_groups,
                config.rl.max_draw_rounds,
            )
            rollout_time = time.perf_counter() - rollout_start
            if record_video:
                logger.info("video: %s", save_rollout_video(all_results, output_dir / "videos", iteration))

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
            if stopped:
                logger.info("signal %s received: stopped at iteration %d after saving", stop.received, iteration)
                break
    finally:
        bar.close()
        vector_env.close()

    # ------------------------------------------------------------------------------------------
    # Summary and an orderly shutdown.
    if accelerator.is_main_process:
        if checkpoint is not None:
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
