"""One training step of the tiny graph pi0 sharded by FSDP2 across the launched ranks, against the
same step unsharded. Launched by tests/test_fsdp.py with `accelerate launch --config_file
accelerate_configs/8gpu_fsdp.yaml --num_processes 2` on a CPU.

accelerate enters FSDP mode only on accelerators (on a CPU it runs the FSDP config as plain
multi-process), so this script hands the plugin that the launcher built from the shipped yaml (its
FSDP_* environment) to accelerate's own FSDP2 preparation, `fsdp2_prepare_model`, which is what
`accelerator.prepare` calls on a GPU; torch's `fully_shard` then shards over gloo. Rank 0 prints
one line per stack with its sharded parameters and `fsdp step ok` when the loss and every
gradient equal the unsharded step's.
"""

import copy
import gc

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from helpers import make_batch, make_config  # this script's directory is on sys.path
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.noise import seeded_noise_and_time

PER_RANK, CHUNK, IMAGE = 2, 4, 64


def make_policy() -> PI0GraphPolicy:
    torch.manual_seed(0)
    return PI0GraphPolicy(make_config(chunk=CHUNK, image=IMAGE))


def check_sharded_step(accelerator: Accelerator) -> None:
    """Shard, step and sample; every check raises on a mismatch."""
    rank, world = accelerator.process_index, accelerator.num_processes
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment (the yaml)
    assert plugin.fsdp_version == 2, plugin.fsdp_version
    accelerator.state.fsdp_plugin = plugin

    policy = make_policy()
    reference = copy.deepcopy(policy)
    # every rank holds the global batch; each trains on its slice
    batch = make_batch(seed=1, size=PER_RANK * world, chunk=CHUNK, image=IMAGE)
    noise, time = seeded_noise_and_time(policy.model, PER_RANK * world, seed=7, device="cpu")

    # The unsharded step on the global batch: what DDP (or one process) computes.
    reference.train()
    reference_loss, _ = reference(batch, noise=noise, time=time)
    reference_loss.backward()

    sharded = fsdp2_prepare_model(accelerator, policy)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    sharded.train()
    loss, _ = sharded({key: value[mine] for key, value in batch.items()}, noise=noise[mine], time=time[mine])
    loss.backward()

    network = sharded.model.paligemma_with_expert
    stacks = {
        "vlm": network.paligemma.model.language_model.layers,
        "expert": network.gemma_expert.model.layers,
        "vision": network.paligemma.model.vision_tower.vision_model.encoder.layers,
    }
    for name, layers in stacks.items():
        parameters = [p for p in layers.parameters() if p.requires_grad]
        linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
        # every weight matrix is its own FSDP group, its rows split across the ranks
        assert linears and all(isinstance(m, FSDPModule) for m in linears), name
        assert all(isinstance(p, DTensor) for p in parameters), name
        local = sum(p.to_local().numel() for p in parameters)
        if rank == 0:
            total = sum(p.numel() for p in parameters)
            print(f"{name}: {len(linears)} sharded linear layers, {local} of {total} parameters on rank 0")

    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    global_loss /= world
    torch.testing.assert_close(global_loss, reference_loss.detach(), rtol=1e-5, atol=1e-6)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    got = {}
    for name, parameter in sharded.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            got[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Sampling takes the other path through the stacks (each layer's own forward, with a KV cache).
    # It does not enter through `forward`, so FSDP is told to gather the root's parameters for it.
    register_fsdp_forward_method(sharded, "predict_action_chunk")
    generator = torch.Generator().manual_seed(3)
    action_noise = torch.randn(PER_RANK * world, CHUNK, policy.config.max_action_dim, generator=generator)[mine]
    my_batch = {key: value[mine] for key, value in batch.items()}
    reference_actions = reference.predict_action_chunk(my_batch, noise=action_noise)
    sharded_actions = sharded.predict_action_chunk(my_batch, noise=action_noise)
    torch.testing.assert_close(sharded_actions, reference_actions, rtol=1e-4, atol=1e-5)
    if rank == 0:
        print(
            f"fsdp step ok: loss {global_loss.item():.6f}, {len(got)} gradients equal the unsharded step's, "
            f"sampled actions equal"
        )


def main() -> None:
    accelerator = Accelerator(cpu=True)
    check_sharded_step(accelerator)
    # The sharded model, its DTensors and FSDP's communication state are freed here, while the
    # process group and the interpreter are both alive; then both ranks pass their last collective
    # and the group ends, so the interpreter's exit has nothing of torch.distributed left to tear
    # down. With the model still alive at the group's end, rank 0 once aborted after every check had
    # passed ("terminate called without an active exception", CI of 2026-12-05).
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
