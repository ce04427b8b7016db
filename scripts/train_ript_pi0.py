"""RIPT: RL post-training of pi0 in LIBERO with Hugging Face Accelerate (the production script).

Each iteration: draw init states (a DataLoader that accelerate shards across ranks), roll out K
episodes from each in vectorized LIBERO envs, keep the groups whose outcomes differ (dynamic
sampling), give every rollout its leave-one-out advantage, and update the flag-conditioned pi0
with `rl.objective` (CFG-RL by default) for a few epochs over the rollout windows: one iteration
of the engine in lib/rl/iteration.py. Statistics are reduced across ranks; every `train.eval_every`
iterations the policy is evaluated on fixed init states. Checkpoints hold weights, processors,
optimizer, RNG, sampler position and per-state outcome history; `--resume latest` continues
exactly; SIGTERM/SIGINT finish the iteration, save and exit 0. Each rank logs to
`output_dir/train_rank{R}.log`; metrics go to the trackers, `metrics.jsonl` and `success.png`.
It is stage 13 (scripts/13_train_production_ready.py) plus evaluation, the advantage statistics
and `--dry_run`; a parity test checks that the two agree.

    python scripts/train_ript_pi0.py --config configs/debug_train_pi0.yaml
    accelerate launch --config_file accelerate_configs/8gpu.yaml scripts/train_ript_pi0.py \
        --config configs/train_pi0_cfg_rl.yaml model.pretrained=/path/to/pi0_libero
    ... --resume latest              # continue the newest checkpoint of output_dir
"""

import argparse
import contextlib
import gc
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType, parse_flag_from_env
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lib.data.soft_arm import open_action_chunks
from lib.envs.libero.rollout import LiberoInitStateDataset, VectorLiberoRollout, collate_fn_state, split_state_batch
from lib.envs.libero.worker import ACTION_DIM
from lib.envs.vector_rollout import TimedPolicy, save_rollout_video
from lib.policies.factories import libero_input_features, make_ript_policy
from lib.policies.loading import resolve_pretrained
from lib.policies.lora import add_lora_adapters, base_policy
from lib.policies.policy_fn import make_policy_fn
from lib.policies.processors import load_tokenizer
from lib.policies.sizes import MODEL_SIZES, backbone_built_uninitialised, count_parameters
from lib.rl.demos import check_demonstrations
from lib.rl.iteration import RIPTIteration, metrics_of
from lib.rl.ript import RL_IDENTITY_KEYS, init_state_key
from lib.run.checkpoint import (
    RunIdentity,
    check_output_dir,
    checkpoint_as_json,
    start_output_dir,
    write_weights_once,
)
from lib.run.config import add_run_arguments, load_config, run_overrides, to_flat_dict
from lib.run.errors import UserError, exit_code_of
from lib.run.keys import stable_key
from lib.run.logs import append_metrics, finish_run, init_trackers, plot_metrics, tee_output
from lib.run.optim import make_optimizer
from lib.run.schemas import TrainRIPTConfig, validate_train_ript_config


# YAML config + CLI overrides + validation, replacing the hard-coded config.
def load_config_from_yaml(path: Path, overrides: list[str]) -> DictConfig:
    """The schema's defaults (lib/run/schemas.py), then the YAML file, then `key=value` overrides."""
    config = load_config(TrainRIPTConfig, path, overrides)
    validate_train_ript_config(config)
    return config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, default_config=Path("configs/train_pi0_cfg_rl.yaml"), example="train.iterations=2")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # Load and validate the YAML config (a bad one: one line, exit 2).
    config = load_config_from_yaml(args.config, run_overrides(args))
    # Refuse an output_dir that holds another run unless it is resumed or
    # overwritten, and find the checkpoint to resume, before anything is written.
    # A dry run (one iteration, nothing saved) writes only its log.
    resume = args.resume or config.resume
    checkpoint = None if args.dry_run else check_output_dir(config.output_dir, resume, args.overwrite)
    # The init states, and so `env.task_names`, are checked before anything is written too, and so
    # are the model source and the tokenizer (an uncached hub id: one line, before any tracker starts).
    dataset = LiberoInitStateDataset(config.env.benchmark, config.env.task_names)
    if config.model.pretrained not in MODEL_SIZES:
        resolve_pretrained(config.model.pretrained)
    load_tokenizer(config.model.tokenizer)
    # The anchor's demonstrations (rl.demo_dataset): LIBERO frames under the policy's input names,
    # at the simulators' camera size (they join the rollout windows' batches).
    demos = None
    if config.rl.demo_dataset is not None:
        demos = open_action_chunks(
            config.rl.demo_dataset, config.model.chunk_size, config.env.camera_size, key="rl.demo_dataset"
        )
        features, action_shape = libero_input_features(config.model.image_size), (config.model.chunk_size, ACTION_DIM)
        check_demonstrations(demos, features, action_shape, config.rl.demo_dataset)
    # The original's setup_distributed(). `cpu=` because a launcher config with
    # `use_cpu: true` starts processes that never connect on a machine without a GPU (docs/dependencies.md).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with=None if args.dry_run else list(config.tracking.report_to) or None,  # tensorboard, wandb
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.collective_timeout_s)),
        ],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    # Every rank's rollouts sample from the whole policy, while sharding leaves each rank a shard
    # between forward passes: refused before anything is written, never a hang mid-run. The launch
    # config's request counts too: on a CPU accelerate runs an FSDP config unsharded, silently.
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP") or accelerator.distributed_type == DistributedType.FSDP
    deepspeed = (
        parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or accelerator.distributed_type == DistributedType.DEEPSPEED
    )
    if fsdp or deepspeed:
        raise UserError(
            f"train_ript_pi0.py does not run under {'FSDP' if fsdp else 'DeepSpeed'}: each rank's rollouts need the "
            "full policy. Launch with DDP (accelerate_configs/8gpu.yaml); the memory levers are "
            "model.train_expert_only, model.freeze_vision_encoder and model.gradient_checkpointing"
        )
    identity = RunIdentity(config, RL_IDENTITY_KEYS)
    if checkpoint is not None:
        identity.check(checkpoint)  # a resume with another objective is another experiment
    if accelerator.is_main_process and not args.dry_run:
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
    # A resumed run gets every weight from its checkpoint (`load_state`, checked), so a fresh size skips
    # the random init (at full size minutes and twice the weights' memory); LoRA rebuilds its base.
    weights_from_checkpoint = checkpoint is not None and not config.model.lora_rank
    with backbone_built_uninitialised() if weights_from_checkpoint else contextlib.nullcontext():
        policy, preprocessor, postprocessor, tokenizer = make_ript_policy(config.model, device)
    if config.model.lora_rank:  # LoRA: adapters and the flag embedding train, the pretrained weights stay frozen
        policy = add_lora_adapters(policy, config.model.lora_rank)
    optimizer = make_optimizer(policy, config.optim)
    # Init states as a PyTorch dataset, batched by a DataLoader that
    # accelerate shards across ranks.
    state_loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.rl.states_per_draw,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn_state,
        # Its own generator: a loader started without one draws a seed from the global RNG, so
        # the policy's sampling noise would depend on whether a resume restarted the loader.
        generator=torch.Generator().manual_seed(config.seed),
    )
    # DDP-wrap the policy; `unwrap_model` is the original's get_model_from_ddp().
    policy, optimizer, state_loader = accelerator.prepare(policy, optimizer, state_loader)
    write_weights_once(accelerator)  # the weights live in pretrained_model/ only
    unwrapped = base_policy(accelerator.unwrap_model(policy))  # the LeRobot policy (inside peft's wrapper)
    policy_fn = TimedPolicy(make_policy_fn(unwrapped, preprocessor, postprocessor, accelerator.autocast))
    print(
        f"{len(dataset)} init states, {len(state_loader)} batches per epoch and rank; "
        f"{count_parameters(policy)} parameters, {count_parameters(policy, trained_only=True)} trained"
    )
    # Fixed init states for evaluation (each rank runs its share).
    eval_states = LiberoInitStateDataset(config.env.benchmark, config.env.task_names, config.train.eval_init_indices)
    eval_shard = [eval_states[i] for i in range(rank, len(eval_states), world)]
    print(f"{len(eval_states)} fixed init states for evaluation")

    # One RIPT iteration end to end (lib/rl/iteration.py): rollouts with dynamic sampling of the init
    # states (groups whose K outcomes all agree are dropped), the update weighted by leave-one-out
    # advantages, the statistics over all ranks, checkpoints and the stop check.
    engine = RIPTIteration(
        accelerator,
        policy,
        optimizer,
        preprocessor,
        policy_fn,
        lambda: next(state_batches),
        init_state_key,
        config.rl,
        config.optim,
        config.seed,
        config.train.iterations,  # the learning-rate schedule's length
        demos=demos,
    )
    # What a checkpoint restores besides weights, optimizer and RNG: per-rank sampler positions and
    # the outcome history.
    progress_state = engine.progress
    checkpoint_as_json(accelerator, progress=progress_state, history=engine.history, identity=identity)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / "training_state"))
        position = f"iteration {progress_state.iteration}, init-state draw {progress_state.draws}"
        print(f"resumed from {checkpoint} at {position}")

    def save() -> Path:
        path = engine.save(output_dir, [preprocessor, postprocessor, tokenizer], config.train.keep_last)
        print(f"saved checkpoint {path}")
        return path

    def draw_state_batches():
        """Init-state batches forever, epoch after epoch (a new shuffle each); resumes at the
        sampler position of the checkpoint."""
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
    if checkpoint is not None and progress_file.exists():  # keep the earlier iterations
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
        # Each rank's simulators render on that rank's GPU, not all on GPU 0.
        render_gpu_device_id=torch.cuda.current_device() if torch.cuda.is_available() else -1,
    )
    last_iteration = progress_state.iteration + 1 if args.dry_run else config.train.iterations
    # Iterations done and the ETA, on the main process's console (stderr: not in the rank logs).
    progress_bar = tqdm(
        total=last_iteration,
        initial=progress_state.iteration,
        desc="RIPT iterations",
        unit="it",
        file=sys.__stderr__,
        disable=not accelerator.is_main_process,
    )
    try:
        for iteration in range(progress_state.iteration + 1, last_iteration + 1):
            # A video of one rollout every `tracking.video_every` iterations.
            record_video = (
                not args.dry_run
                and accelerator.is_main_process
                and config.tracking.video_every > 0
                and (iteration % config.tracking.video_every == 0)
            )
            result = engine.run(iteration, envs, record_first=record_video)
            record = {"iteration": iteration, **result.record}
            if record_video:
                print(f"video: {save_rollout_video(result.episodes, output_dir / 'videos', iteration)}")
            # Evaluation on the fixed init states.
            if not args.dry_run and (iteration % config.train.eval_every == 0 or iteration == last_iteration):
                unwrapped.eval()
                eval_results = envs.run(eval_shard, engine.policy_fn) if eval_shard else []
                eval_successes, eval_episodes = accelerator.reduce(
                    torch.tensor([sum(r.success for r in eval_results), len(eval_results)], device=accelerator.device),
                    "sum",
                ).tolist()
                record["eval_success_rate"] = eval_successes / max(eval_episodes, 1)
                print(f"evaluation: success {record['eval_success_rate']:.2f} on {eval_episodes} fixed init states")
            progress["iterations"].append(record)
            # Metrics to the trackers and to metrics.jsonl.
            metrics = metrics_of({k: v for k, v in record.items() if k != "iteration"})
            accelerator.log(metrics, step=iteration)
            if accelerator.is_main_process and not args.dry_run:
                progress_file.write_text(json.dumps(progress, indent=2))
                append_metrics(metrics_file, iteration, metrics)
            print(
                f"iteration {iteration}/{config.train.iterations}: success {record['success_rate']:.2f}, "
                f"{record['groups_kept']} groups kept, {record['update_steps']} updates, loss {record['loss']}, "
                f"rollout {record['rollout_time_s']:.1f} s, update {record['update_time_s']:.1f} s, "
                f"{record['rss_gib']:.1f} GiB RSS"
            )
            progress_bar.update()
            # Free what the iteration left behind (rollout windows, frames).
            del result
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

            # Checkpoints, and a clean stop on SIGTERM/SIGINT.
            stopped = engine.should_stop()
            if not args.dry_run and (
                iteration % config.train.save_every == 0 or iteration == last_iteration or stopped
            ):
                checkpoint = save()
            if stopped:
                print(f"signal {engine.stop.received} received: stopped at iteration {iteration} after saving")
                break
    except Exception:
        # The failure goes to this rank's log; resume from the last checkpoint.
        traceback.print_exc()
        print(f"iteration {progress_state.iteration + 1} failed; resume with --resume latest", file=sys.stderr)
        raise
    finally:
        progress_bar.close()
        envs.close()
    if args.dry_run:
        print(
            f"dry run ok: one iteration on {world} process(es), {record['episodes']} episodes, "
            f"{record['update_steps']} updates"
        )
    else:
        print(f"progress written to {progress_file}")
    # A plot of the success rate, and where the logs are.
    if accelerator.is_main_process and not args.dry_run and metrics_file.exists():
        plot_metrics(
            metrics_file, output_dir / "success.png", ("ript/success_rate", "ript/eval_success_rate"), log_scale=False
        )
    print(f"logs: {log_file} (one per rank), metrics: {metrics_file}")
    if checkpoint is not None:
        print(f"checkpoint: {checkpoint / 'pretrained_model'}")
    # The original's cleanup_distributed(): drop the last references, then an orderly end.
    policy = optimizer = unwrapped = state_loader = None
    finish_run(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
