"""FSDP that really shards pi0: accelerate_configs/8gpu_fsdp.yaml on 2 CPU ranks (gloo)."""

import os

import pytest
from helpers import ACCELERATE, TWO_RANK_LAUNCH, run


@TWO_RANK_LAUNCH
@pytest.mark.slow
def test_the_fsdp_config_shards_both_stacks_and_matches_the_unsharded_step():
    """The shipped FSDP config, through accelerate's own FSDP2 preparation, shards every weight
    matrix of the VLM, the action expert and the vision tower across 2 ranks, and one step's loss,
    every gradient and the sampled actions equal the unsharded model's (tests/fsdp_sharded_step.py).
    With the layer-class wrapping this config had before, the forward failed on parameters that
    were never gathered."""
    launch = [ACCELERATE, "launch", "--config_file", "accelerate_configs/8gpu_fsdp.yaml", "--num_processes", "2"]
    # a rank that aborts prints its threads' Python stacks (one abort at exit was seen in CI)
    environment = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    result = run([*launch, "--mixed_precision", "no", "tests/fsdp_sharded_step.py"], env=environment)
    for stack in ("vlm: 14", "expert: 14", "vision: 6"):
        assert f"{stack} sharded linear layers" in result.stdout
    assert "fsdp step ok" in result.stdout and "sampled actions equal" in result.stdout
