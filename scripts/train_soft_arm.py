"""Fine-tune graph pi0 on soft-arm episodes (flow matching) with Hugging Face Accelerate.

    # CPU / 1 GPU
    python scripts/train_soft_arm.py --config configs/debug_config.yaml
    # 8 GPUs, bf16 DDP (FSDP: accelerate_configs/8gpu_fsdp.yaml)
    accelerate launch --config_file accelerate_configs/8gpu.yaml scripts/train_soft_arm.py \
        --config configs/soft_arm_config.yaml model.pretrained=lerobot/pi0_base
    # continue the newest checkpoint of the run
    ... scripts/train_soft_arm.py --config configs/soft_arm_config.yaml --resume latest
    # any config key from the command line
    ... scripts/train_soft_arm.py --config configs/debug_config.yaml train.steps=200 optim.lr=3e-4

Checkpoints land in `<output_dir>/checkpoints/step_N/pretrained_model` (load with
`PI0GraphPolicy.from_pretrained`) and `.../training_state` (`accelerator.load_state`).
SIGTERM/SIGINT finish the current step, save a checkpoint and exit 0.
"""

import argparse
import contextlib
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import set_seed
from lerobot.configs import FeatureType, PolicyFeature
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lib.data.soft_arm import dataset_stats, make_soft_arm_datasets
from lib.envs.soft_arm.features import ACTION_DIM, ACTION_KEY, GRAPH_KEY, IMAGE_KEY, NODE_FEATURES, NUM_NODES, STATE_KEY
from lib.policies.graph_pi0 import PI0GraphConfig, PI0GraphPolicy
from lib.policies.loading import make_pi0_policy, resolve_pretrained, saved_model_size
from lib.policies.lora import add_lora_adapters, base_policy
from lib.policies.noise import keyed_noise_and_time
from lib.policies.processors import load_tokenizer, make_pi0_processors
from lib.policies.sizes import MODEL_SIZES, backbone_built_uninitialised, count_parameters
from lib.run.checkpoint import (
    check_output_dir,
    checkpoint_as_json,
    save_policy_checkpoint,
    start_output_dir,
    write_weights_once,
)
from lib.run.config import add_run_arguments, load_config, run_overrides, to_flat_dict
from lib.run.errors import UserError, exit_code_of
from lib.run.faults import raise_if_injected
from lib.run.guards import GracefulStop, NonFiniteGuard
from lib.run.hub import check_hub_push, push_folder
from lib.run.keys import stable_key
from lib.run.logs import append_metrics, finish_run, init_trackers, plot_metrics, setup_logging
from lib.run.optim import cosine_with_warmup, make_optimizer
from lib.run.schemas import SoftArmTrainConfig, validate_soft_arm_train_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, default_config=None, example="train.steps=100")
    return parser.parse_args()


class TrainingProgress:
    """Optimizer steps taken; saved in `training_state/state.json` (`checkpoint_as_json`)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main() -> int:
    args = parse_args()
    # Config: the schema's defaults (lib/run/schemas.py), then the YAML file, then `key=value` overrides.
    config = load_config(SoftArmTrainConfig, args.config, run_overrides(args))
    validate_soft_arm_train_config(config)
    output_dir = Path(config.output_dir)
    # Refuse a directory that holds another run, and find the checkpoint to resume, before anything
    # is written (a dry run writes only its log).
    resume = args.resume or config.resume
    checkpoint = None if args.dry_run else check_output_dir(output_dir, resume, args.overwrite)
    if config.hub.repo_id and not args.dry_run:
        check_hub_push(config.hub.repo_id, "hub.repo_id")  # before training, not after it
    # The model source and the tokenizer, resolved before any data is read: an uncached hub id is one
    # line here, not after the dataset and its loader workers. A hub id resolves once, through the
    # Hugging Face cache, for its size and its weights.
    fresh = config.model.pretrained in MODEL_SIZES
    source = config.model.pretrained if fresh else resolve_pretrained(config.model.pretrained)
    tokenizer = load_tokenizer(config.model.tokenizer)

    # ------------------------------------------------------------------------------------------
    # Accelerator. `cpu=` because on a machine without a GPU, a launcher config with
    # `use_cpu: true` starts processes that never connect (docs/dependencies.md); MULTI_GPU + this
    # gives real gloo ranks on CPU. find_unused_parameters: the graph encoder idles on batches
    # without a graph.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if args.dry_run else list(config.tracking.report_to) or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.collective_timeout_s)),
        ],
    )
    if accelerator.is_main_process and not args.dry_run:
        start_output_dir(output_dir, checkpoint, args.overwrite)
    accelerator.wait_for_everyone()
    logger = setup_logging(output_dir, accelerator.process_index, accelerator.is_main_process)
    logger.info(
        "processes: %d (%s), device: %s, mixed precision: %s",
        accelerator.num_processes,
        accelerator.distributed_type,
        accelerator.device,
        accelerator.mixed_precision,
    )
    set_seed(config.seed)

    # ------------------------------------------------------------------------------------------
    # Data: 16-step action chunks, 224 px images, the current graph; split by episode.
    train_dataset, val_dataset = make_soft_arm_datasets(
        config.data.root, config.data.val_fraction, config.seed, config.data.chunk_size, config.data.image_size
    )
    logger.info(
        "dataset %s: %d train frames, %d val frames",
        config.data.root,
        len(train_dataset),
        len(val_dataset) if val_dataset else 0,
    )
    loader_kwargs = {
        "batch_size": config.data.batch_size,
        "num_workers": config.data.num_workers,
        "pin_memory": torch.cuda.is_available(),
    }
    train_loader = torch.utils.data.DataLoader(train_dataset, shuffle=True, drop_last=True, **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(val_dataset, shuffle=False, **loader_kwargs) if val_dataset else None
    if len(train_loader) == 0:
        raise UserError(f"{len(train_dataset)} train frames < data.batch_size {config.data.batch_size}")

    # ------------------------------------------------------------------------------------------
    # Policy: graph pi0 from a pretrained checkpoint or a fresh size, and its processors.
    state_dim = train_dataset.meta.features[STATE_KEY]["shape"][0]
    image_shape = (3, config.data.image_size, config.data.image_size)
    policy_config = PI0GraphConfig(
        model_size=config.model.pretrained if fresh else saved_model_size(source),
        use_graph=config.model.use_graph,
        dtype=config.model.dtype,
        chunk_size=config.data.chunk_size,
        n_action_steps=config.data.chunk_size,
        gradient_checkpointing=config.model.gradient_checkpointing,
        freeze_vision_encoder=config.model.freeze_vision_encoder,
        train_expert_only=config.model.train_expert_only,
        compile_model=config.model.compile,
        compile_mode=config.model.compile_mode,
        device=accelerator.device.type,  # LeRobot takes "cuda"; accelerate has set the current GPU
        input_features={
            IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=image_shape),
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,)),
            GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(NUM_NODES, NODE_FEATURES)),
        },
        output_features={ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
    )
    # Loading is checked (lib/policies/loading.py): a plain pi0 checkpoint gets a fresh graph encoder and
    # nothing else may be missing.
    # A resumed run gets every weight from its checkpoint (`load_state`, checked), so a fresh size skips
    # the random init (at full size minutes and twice the weights' memory); LoRA rebuilds its base.
    weights_from_checkpoint = fresh and checkpoint is not None and not config.model.lora_rank
    with backbone_built_uninitialised() if weights_from_checkpoint else contextlib.nullcontext():
        policy = make_pi0_policy(source, policy_config, PI0GraphPolicy)
    preprocessor, postprocessor = make_pi0_processors(policy.config, tokenizer, dataset_stats(train_dataset))
    if config.model.lora_rank:  # LoRA: adapters train, the pretrained weights stay frozen
        policy = add_lora_adapters(policy, config.model.lora_rank)
    logger.info(
        "policy: %s pi0 with graph=%s, %.2f M parameters, %.2f M trained",
        policy_config.model_size,
        config.model.use_graph,
        count_parameters(policy) / 1e6,
        count_parameters(policy, trained_only=True) / 1e6,
    )

    # ------------------------------------------------------------------------------------------
    # Optimizer (AdamW, openpi's betas) and warm-up + cosine schedule. The scheduler is stepped
    # by hand once per optimizer step, so the schedule does not depend on the process count.
    optimizer = make_optimizer(policy, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        cosine_with_warmup(config.optim.warmup_steps, config.train.steps, config.optim.decay_lr / config.optim.lr),
    )
    policy, optimizer, train_loader, val_loader = accelerator.prepare(policy, optimizer, train_loader, val_loader)
    write_weights_once(accelerator)  # the weights live in pretrained_model/ only
    progress = TrainingProgress()
    checkpoint_as_json(accelerator, scheduler=scheduler, progress=progress)  # in training_state/state.json

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / "training_state"))
        logger.info("resumed from %s at step %d", checkpoint, progress.step)

    def save(step: int) -> Path:
        path = save_policy_checkpoint(
            accelerator, output_dir, step, policy, [preprocessor, postprocessor, tokenizer], config.train.keep_last
        )
        logger.info("saved checkpoint %s", path)
        return path

    def flow_loss(batch: dict, epoch: int) -> torch.Tensor:
        """The flow-matching loss with each frame's noise and time keyed by (seed, epoch, frame):
        independent of the batch size, the accumulation steps and the rank count, and the same
        again after a resume. Validation passes epoch -1: the same noise at every evaluation."""
        keys = [stable_key("flow noise", config.seed, epoch, int(i)) for i in batch["index"]]
        batch = preprocessor(batch)
        network = base_policy(accelerator.unwrap_model(policy)).model
        noise, flow_time = keyed_noise_and_time(network, keys, accelerator.device)
        loss, _ = policy(batch, noise=noise, time=flow_time)
        return loss

    @torch.no_grad()
    def validation_loss() -> float:
        """Mean loss over `val_batches` val batches with fixed noise: comparable across steps."""
        policy.eval()
        total = torch.zeros(2, device=accelerator.device)
        for index, batch in enumerate(val_loader):
            if index >= config.train.val_batches:
                break
            with accelerator.autocast():
                loss = flow_loss(batch, epoch=-1)
            total += torch.stack(
                [
                    loss.detach().float() * len(batch[ACTION_KEY]),
                    torch.tensor(float(len(batch[ACTION_KEY])), device=accelerator.device),
                ]
            )
        policy.train()
        total = accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()

    # ------------------------------------------------------------------------------------------
    # Trackers and the loop.
    total_steps = 1 if args.dry_run else config.train.steps
    if not args.dry_run:
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
    stop = GracefulStop()
    nonfinite = NonFiniteGuard(config.train.max_nonfinite_steps)
    accumulation = config.train.gradient_accumulation_steps
    batches_per_epoch = len(train_loader)
    step = progress.step
    micro_step = step * accumulation
    running_loss = torch.zeros((), device=accelerator.device)
    running_count = 0
    train_loss = val_loss = None
    stopped = False
    progress_bar = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    window_start = time.perf_counter()
    policy.train()
    while step < total_steps and not stopped:
        epoch, skip = divmod(micro_step, batches_per_epoch)
        # The seedable sampler shuffles by (seed, epoch): skipping the batches already seen this
        # epoch puts a resumed run on the batch the uninterrupted run would see.
        epoch_loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            raise_if_injected(accelerator.process_index, step + 1)
            with accelerator.accumulate(policy):
                loss = nonfinite.inject(flow_loss(batch, epoch), step + 1)
                accelerator.backward(loss)
                apply_update = True
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), config.optim.grad_clip_norm)
                    apply_update = nonfinite.is_finite(grad_norm, step + 1)  # a NaN step is skipped, not applied
                if apply_update:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            running_loss += loss.detach().float()
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            progress.step = step
            progress_bar.update(1)

            if step % config.train.log_every == 0 or step == total_steps:
                train_loss = accelerator.reduce(running_loss / running_count, reduction="mean").item()
                elapsed = time.perf_counter() - window_start
                samples = running_count * config.data.batch_size * accelerator.num_processes
                metrics = {
                    "train/loss": train_loss,
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": samples / elapsed,
                    "train/epoch": epoch,
                    "train/nonfinite_skipped": nonfinite.pop_skipped(),
                }
                if torch.cuda.is_available():
                    metrics["train/gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                accelerator.log(metrics, step=step)
                if accelerator.is_main_process:
                    append_metrics(metrics_file, step, metrics)
                progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
                logger.info(
                    "step %d loss %.4f lr %.3e grad_norm %.3f %.1f samples/s",
                    step,
                    train_loss,
                    metrics["train/lr"],
                    metrics["train/grad_norm"],
                    metrics["train/samples_per_s"],
                )
                running_loss.zero_()
                running_count = 0
                window_start = time.perf_counter()

            if val_loader is not None and (step % config.train.val_every == 0 or step == total_steps):
                val_loss = validation_loss()
                accelerator.log({"val/loss": val_loss}, step=step)
                if accelerator.is_main_process:
                    append_metrics(metrics_file, step, {"val/loss": val_loss})
                logger.info("step %d val loss %.4f", step, val_loss)

            # With several ranks the stop check is a host sync: every log_every steps, when the loss
            # and grad norm are read too, so the hot loop does not wait on the host in between.
            stopped = stop.should_stop(accelerator, step, every=config.train.log_every)
            if not args.dry_run and (step % config.train.save_every == 0 or step == total_steps or stopped):
                checkpoint = save(step)
            if stopped:
                logger.info("signal %s received: stopped at step %d after saving", stop.received, step)
            if stopped or step >= total_steps:
                break
    progress_bar.close()

    # ------------------------------------------------------------------------------------------
    # Summary, then an orderly shutdown (gloo aborts at exit on Python 3.12 without it).
    if accelerator.is_main_process and not args.dry_run:
        if checkpoint is not None:
            print(f"checkpoint: {checkpoint / 'pretrained_model'}")
        print(f"final train loss: {train_loss}  final val loss: {val_loss}")
        if metrics_file.exists():
            plot_metrics(metrics_file, output_dir / "loss.png", ("train/loss", "val/loss"))
        if config.hub.repo_id and checkpoint is not None and step >= total_steps:  # finished runs only
            url = push_folder(
                checkpoint / "pretrained_model", config.hub.repo_id, config.hub.private, f"{checkpoint.name}"
            )
            print(f"pushed {checkpoint / 'pretrained_model'} to {url}")
    if args.dry_run:
        logger.info("dry run ok: one step on %d process(es), loss %.4f", accelerator.num_processes, loss.item())
    policy = optimizer = train_loader = val_loader = None  # drop the last references (finish_run)
    finish_run(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
