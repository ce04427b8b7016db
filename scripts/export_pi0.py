"""Export a checkpoint of this project as a plain LeRobot `pi0` checkpoint, exactly.

Exact exports exist for:
  - a `pi0_cfg` (or `pi0_graph_cfg`) checkpoint at guidance weight 1: it samples with the optimal
    flag alone, whose embedding is a constant added to the state token, so it folds into the state
    projection's bias;
  - a graph checkpoint (`pi0_graph`, `pi0_graph_cfg`) trained with `model.use_graph=false`: it has no
    graph encoder, and its network is plain pi0's.
Anything else is refused with the reason: a graph in use (plain pi0 has no graph tokens) or a
guidance weight other than 1 (two branches mixed at every denoising step).

The output holds the weights (loaded strictly into LeRobot's own `PI0Policy` and saved by it), a
`type: pi0` config.json with only `PI0Config` fields, and the source's processors and tokenizer.

    python scripts/export_pi0.py --checkpoint outputs/ript/checkpoints/last/pretrained_model \
        --output_dir outputs/ript/pi0_export
    lerobot-eval --policy.path=outputs/ript/pi0_export ...
"""

import argparse
import dataclasses
import shutil
from pathlib import Path

from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from safetensors.torch import load_file

from lib.policies.flag_pi0 import OPTIMAL_FLAG
from lib.policies.graph_pi0 import GRAPH_KEY
from lib.policies.loading import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_weights_into,
    resolve_pretrained,
    saved_config,
)
from lib.policies.sizes import backbone_built_uninitialised, model_size_context
from lib.run.errors import UserError, exit_code_of

EXPORTABLE_TYPES = ("pi0_cfg", "pi0_graph", "pi0_graph_cfg")
FLAG_KEY = "model.condition_embedding.weight"
STATE_BIAS_KEY = "model.state_proj.bias"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pretrained_model directory (or hub id) of this project")
    parser.add_argument("--output_dir", type=Path, required=True, help="where the plain pi0 checkpoint goes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    return parser.parse_args()


def check_exportable(saved: dict, source: Path) -> None:
    """Refuse a checkpoint that no plain pi0 reproduces exactly, naming why."""
    policy_type = saved.get("type")
    if policy_type == "pi0":
        raise UserError(f"{source} is already a plain pi0 checkpoint")
    if policy_type not in EXPORTABLE_TYPES:
        raise UserError(f"{source} holds a {policy_type!r} policy; export_pi0 exports {', '.join(EXPORTABLE_TYPES)}")
    if saved.get("use_graph", False):
        raise UserError(
            f"{source} uses its graph (use_graph: true): plain pi0 has no graph tokens, so no exact export exists "
            "(a graph checkpoint trained with model.use_graph=false exports)"
        )
    guidance_weight = saved.get("guidance_weight", 1.0)
    if guidance_weight != 1.0:
        raise UserError(
            f"{source} samples with guidance weight {guidance_weight}: it mixes two branches at every denoising step, "
            "which no single pi0 computes (export it at guidance_weight 1, where the optimal flag folds into the "
            "state projection)"
        )


def plain_pi0_config(source: Path) -> PI0Config:
    """LeRobot's own `PI0Config` holding every setting of the source's config that `PI0Config`
    has; the graph input (unused without a graph encoder) is dropped."""
    source_config = PreTrainedConfig.from_pretrained(source)
    values = {f.name: getattr(source_config, f.name) for f in dataclasses.fields(PI0Config) if f.init}
    values["input_features"] = {key: f for key, f in source_config.input_features.items() if key != GRAPH_KEY}
    return PI0Config(**values)


def main() -> int:
    args = parse_args()
    source = resolve_pretrained(args.checkpoint)
    saved = saved_config(source)
    check_exportable(saved, source)
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        raise UserError(f"output_dir {args.output_dir} is not empty (pass --overwrite to replace it)")
    if args.output_dir.resolve() == source.resolve():
        raise UserError("--output_dir must differ from --checkpoint")

    weights_file = source / WEIGHTS_FILE
    try:
        state_dict = load_file(weights_file)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{weights_file} is truncated or corrupt ({str(error).splitlines()[0]})") from error
    if FLAG_KEY in state_dict:
        # At guidance weight 1 every state token gets the optimal flag's embedding added:
        # state_proj(s) + e = W s + (b + e).
        flag = state_dict.pop(FLAG_KEY)[OPTIMAL_FLAG]
        bias = state_dict[STATE_BIAS_KEY]
        state_dict[STATE_BIAS_KEY] = (bias.float() + flag.float()).to(bias.dtype)

    config = plain_pi0_config(source)
    # Built without random init: the strict load below fills every weight (at full size the random
    # init alone would take minutes and, beside the loaded state dict, more memory than the weights).
    with model_size_context(saved.get("model_size", "full")), backbone_built_uninitialised():
        policy = PI0Policy(config)
    load_weights_into(policy, weights_file, state_dict)  # strict: every key of plain pi0 filled, none left over

    staging = args.output_dir.with_name(f".tmp_{args.output_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    policy.save_pretrained(staging)
    for file in source.iterdir():  # processors (normalization statistics) and tokenizer, unchanged
        if file.is_file() and file.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(file, staging / file.name)
    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    staging.rename(args.output_dir)
    print(f"exported {saved['type']} {source} as plain pi0: {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code_of(main))
