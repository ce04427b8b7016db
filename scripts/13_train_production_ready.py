"""Stage 13 of the RIPT reproduction: stage 12 + production readiness (see scripts/STAGES.md).

New: checkpoints (weights + config + processors in `pretrained_model/`, optimizer, RNG, iteration,
sampler position and per-state outcome history in `training_state/`) every `train.save_every`
iterations; `--resume` continues the newest one; SIGTERM/SIGINT finish the iteration, save and
exit 0 (a second signal ends the process at once); memory is reported and garbage-collected every
iteration; a failed iteration is reported with its traceback in the rank's log before the run
stops (resume from the last checkpoint); rollout and update throughput are measured.

    python scripts/13_train_production_ready.py --config configs/debug_train_pi0.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/13_train_production_ready.py \
        --config configs/minimal_test.yaml
    ... scripts/13_train_production_ready.py --config configs/minimal_test.yaml --resume latest
"""

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf

from lib.envs.libero.rollout import LiberoInitStateDataset, VectorLiberoRollout, collate_fn_state, split_state_batch
from lib.envs.vector_rollout import save_rollout_video
from lib.policies.factories import make_ript_policy
from lib.policies.noise import keyed_noise_and_time
from lib.policies.policy_fn import make_policy_fn
from lib.rl.ript import (
    RIPTProgress,
    StateOutcomeHistory,
    collect_informative_groups,
    init_state_key,
    minibatch_order,
    rollout_groups,
    window_batch,
    window_noise_keys,
    windows_with_advantages,
)
from lib.run.checkpoint import check_output_dir, checkpoint_as_json, save_policy_checkpoint, start_output_dir
from lib.run.config import load_config, run_overrides, to_flat_dict
from lib.run.errors import exit_code_of
from lib.run.guards import GracefulStop
from lib.run.keys import stable_key
from lib.run.logs import append_metrics, init_trackers, plot_metrics, tee_output
from lib.run.schemas import RIPTConfig, validate_config


# YAML config + CLI overrides + validation, replacing the hard-coded config.
def load_config_from_yaml(path: Path, overrides: list[str]) -> DictConfig:
    """The schema's defaults (lib/run/schemas.py), then the YAML file, then `key=value` overrides."""
    config = load_config(RIPTConfig, path, overrides)
    validate_config(config)
    return config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A config file and overrides instead of a few fixed flags.
    parser.add_argument(
        "--config", "--config_path", dest="config", type=Path, default=Path("configs/debug_train_pi0.yaml")
    )
    # New in stage 13: where the run writes, continue it, or replace the run that output_dir holds.
    parser.add_argument("--output_dir", help="where the run writes (overrides the config's output_dir)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' (newest of output_dir) or a checkpoint dir")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that output_dir already holds")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.iterations=2")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # Load and validate the YAML config (a bad one: one line, exit 2).
    config = load_config_from_yaml(args.config, run_overrides(args))
    # New in stage 13: refuse an output_dir that holds another run unless it is resumed or
    # overwritten, and find the checkpoint to resume, before anything is written.
    checkpoint = check_output_dir(config.output_dir, args.resume or config.resume, args.overwrite)
    # The original's setup_distributed(). `cpu=` because a launcher config with
    # `use_cpu: true` starts processes that never connect on a machine without a GPU (docs/dependencies.md).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with=list(config.tracking.report_to) or None,  # trackers
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:  # New in stage 13
        start_output_dir(config.output_dir, checkpoint, args.overwrite)
    accelerator.wait_for_everyone()
    # Every rank prints into output_dir/train_rank{R}.log; only the main
    # process's output also reaches the console.
    log_file = tee_output(config.output_dir, rank, accelerator.is_main_process)
    print(f"✓ config loaded from {args.config} and validated")
    print(f"processes: {world} ({accelerator.distributed_type}), device: {accelerator.device}")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    print(f"config: {OmegaConf.to_container(config)}")
    # Trackers (wandb offline by default, its run id kept for re-runs).
    init_trackers(
        accelerator,
        output_dir,
        config.tracking.project,
        config.tracking.run_name,
        to_flat_dict(config),
        config.tracking.wandb_mode,
    )
    metrics_file = output_dir / "metrics.jsonl"

    # Policy: the flag-conditioned pi0 and its processors.
    device = accelerator.device.type
    policy, preprocessor, postprocessor, tokenizer = make_ript_policy(config.model, device)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    # Init states as a PyTorch dataset, batched by a DataLoader that
    # accelerate shards across ranks.
    dataset = LiberoInitStateDataset(config.env.benchmark, config.env.task_names)
    state_loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.rl.states_per_draw,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn_state,
        # New in stage 13: its own generator. A loader started without one draws a seed from the
        # global RNG, so the policy's sampling noise would depend on whether a resume restarted it.
        generator=torch.Generator().manual_seed(config.seed),
    )
    # DDP-wrap the policy; `unwrap_model` is the original's get_model_from_ddp().
    policy, optimizer, state_loader = accelerator.prepare(policy, optimizer, state_loader)
    unwrapped = accelerator.unwrap_model(policy)
    policy_fn = make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast)
    history = StateOutcomeHistory(skip_after=config.rl.skip_after, skip_for=config.rl.skip_for)
    parameters = sum(p.numel() for p in policy.parameters())
    print(f"{len(dataset)} init states, {len(state_loader)} batches per epoch and rank; {parameters} parameters")

    # New in stage 13: what a checkpoint restores besides weights, optimizer and RNG.
    progress_state = RIPTProgress(rank, world)  # per-rank sampler positions
    checkpoint_as_json(accelerator, progress=progress_state, history=history)  # training_state/state.json
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / "training_state"))
        position = f"iteration {progress_state.iteration}, init-state draw {progress_state.draws}"
        print(f"resumed from {checkpoint} at {position}")

    def save(iteration: int) -> Path:
        """New in stage 13: an atomic checkpoint; every rank's outcome history and sampler position
        go into it."""
        history.merge(gather_object([history.state_dict()]))
        progress_state.gather_draws(gather_object)  # ranks draw different numbers of batches
        path = save_policy_checkpoint(
            accelerator, output_dir, iteration, policy, [preprocessor, postprocessor, tokenizer], config.train.keep_last
        )
        print(f"saved checkpoint {path}")
        return path

    def draw_state_batches():
        """Init-state batches forever, epoch after epoch (a new shuffle each); resumes at the
        sampler position of the checkpoint (New in stage 13)."""
        while True:
            epoch, skip = divmod(progress_state.draws, len(state_loader))
            loader = accelerator.skip_first_batches(state_loader, skip) if skip else state_loader
            loader.set_epoch(epoch)
            for batch in loader:
                progress_state.draws += 1
                yield split_state_batch(batch)

    state_batches = draw_state_batches()

    progress_file = output_dir / "progress.json"
    progress = {"config": OmegaConf.to_container(config), "iterations": []}
    if checkpoint is not None and progress_file.exists():  # New in stage 13: keep the earlier iterations
        progress["iterations"] = [
            r for r in json.loads(progress_file.read_text())["iterations"] if r["iteration"] <= progress_state.iteration
        ]
    envs = VectorLiberoRollout(
        config.env.benchmark,
        config.env.num_envs,
        config.env.camera_size,
        config.env.max_steps,
        config.env.replan_steps,
        seed=stable_key("simulators", config.seed, rank),
        settle_steps=config.env.settle_steps,
        # Each rank's simulators render on that rank's GPU, not all on EGL's default one.
        render_gpu_device_id=torch.cuda.current_device() if torch.cuda.is_available() else -1,
    )
    all_results = []  # every episode rolled out in the current iteration
    stop = GracefulStop()  # New in stage 13: SIGTERM/SIGINT -> save and exit 0
    process = psutil.Process()
    try:
        for iteration in range(progress_state.iteration + 1, config.train.iterations + 1):
            # Rollouts with smart sampling: keep only groups whose K outcomes differ.
            started = time.perf_counter()
            all_results.clear()
            # A video of one rollout every `tracking.video_every` iterations.
            record_video = (
                accelerator.is_main_process
                and config.tracking.video_every > 0
                and (iteration % config.tracking.video_every == 0)
            )
            kept, stats = collect_informative_groups(
                lambda: next(state_batches),
                lambda states, record=record_video: rollout_groups(
                    envs, policy_fn, states, config.rl.rollouts_per_state, all_results, record_first=record
                ),
                init_state_key,
                history,
                config.rl.target_groups,
                config.rl.max_draw_rounds,
            )
            rollout_time = time.perf_counter() - started
            if record_video:
                print(f"video: {save_rollout_video(all_results, output_dir / 'videos', iteration)}")

            # Batched training on the kept rollouts' windows, weighted by leave-one-out advantage.
            windows, advantages = windows_with_advantages(kept)
            losses = []
            # Every rank must run the same number of DDP steps; the rank with the
            # most windows sets it, the others cycle through theirs; no update if a rank has none.
            counts = accelerator.gather(torch.tensor([len(windows)], device=accelerator.device))
            if int(counts.min()) > 0:
                unwrapped.train()
                steps = config.rl.update_epochs * math.ceil(int(counts.max()) / config.rl.minibatch_size)
                order_seed = stable_key("minibatch order", config.seed, iteration, rank)
                for step, picked in enumerate(
                    minibatch_order(len(windows), steps, config.rl.minibatch_size, order_seed)
                ):
                    batch, batch_advantages = window_batch(windows, advantages, picked, config.model.chunk_size)
                    batch = preprocessor(batch)
                    keys = window_noise_keys(
                        config.seed,
                        iteration,
                        step,
                        picked,
                        minibatch_size=config.rl.minibatch_size,
                        num_windows=len(windows),
                        rank=rank,
                    )
                    noise, flow_time = keyed_noise_and_time(unwrapped.model, keys, accelerator.device)
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
            update_time = time.perf_counter() - started - rollout_time  # New in stage 13

            # Statistics summed (loss averaged) over all ranks.
            successes, episodes, groups, dropped_success, dropped_failure, env_steps = accelerator.reduce(
                torch.tensor(
                    [
                        sum(r.success for r in all_results),
                        len(all_results),
                        len(kept),
                        stats.dropped_all_success,
                        stats.dropped_all_failure,
                        sum(r.length for r in all_results),
                    ],
                    device=accelerator.device,
                ),
                "sum",
            ).tolist()
            record = {
                "iteration": iteration,
                "success_rate": successes / max(episodes, 1),
                "episodes": episodes,
                "groups_kept": groups,
                "dropped_all_success": dropped_success,
                "dropped_all_failure": dropped_failure,
                "update_steps": len(losses),
                "loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item() if losses else None,
                "rollout_time_s": rollout_time,
                # New in stage 13: performance and memory monitoring.
                "update_time_s": update_time,
                "env_steps_per_s": env_steps / max(rollout_time, 1e-9),
                "worker_restarts": envs.worker_restarts,
                "rss_gib": process.memory_info().rss / 2**30,
                "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            }
            progress["iterations"].append(record)
            # Metrics to the trackers and to metrics.jsonl.
            metrics = {
                f"ript/{key}": value for key, value in record.items() if key != "iteration" and value is not None
            }
            accelerator.log(metrics, step=iteration)
            if accelerator.is_main_process:
                progress_file.write_text(json.dumps(progress, indent=2))
                append_metrics(metrics_file, iteration, metrics)
            print(
                f"iteration {iteration}/{config.train.iterations}: success {record['success_rate']:.2f}, "
                f"{groups} groups kept, {len(losses)} updates, loss {record['loss']}, "
                f"rollout {rollout_time:.1f} s, update {update_time:.1f} s, {record['rss_gib']:.1f} GiB RSS"
            )
            progress_state.iteration = iteration
            # New in stage 13: free what the iteration left behind (rollout windows, frames).
            del kept, windows, advantages
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

            # New in stage 13: checkpoints, and a clean stop on SIGTERM/SIGINT.
            stopped = stop.should_stop(accelerator)
            if iteration % config.train.save_every == 0 or iteration == config.train.iterations or stopped:
                checkpoint = save(iteration)
            if stopped:
                print(f"signal {stop.received} received: stopped at iteration {iteration} after saving")
                break
    except Exception:
        # New in stage 13: the failure goes to this rank's log; resume from the last checkpoint.
        traceback.print_exc()
        print(f"iteration {progress_state.iteration + 1} failed; resume with --resume latest", file=sys.stderr)
        raise
    finally:
        envs.close()
    print(f"progress written to {progress_file}")
    # A plot of the success rate, and where the logs are.
    if accelerator.is_main_process and metrics_file.exists():
        plot_metrics(metrics_file, output_dir / "success.png", ("ript/success_rate",), log_scale=False)
    print(f"logs: {log_file} (one per rank), metrics: {metrics_file}")
    if checkpoint is not None:
        print(f"checkpoint: {checkpoint / 'pretrained_model'}")
    # The original's cleanup_distributed(); an orderly end (gloo aborts at exit on
    # Python 3.12 without it).
    accelerator.wait_for_everyone()
    policy = optimizer = unwrapped = state_loader = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))  # New in stage 13: a clear message and exit 2 for bad input
