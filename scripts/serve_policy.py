"""Serve a trained checkpoint to a robot over the network, the two ways pi0 users deploy.

    python scripts/serve_policy.py --checkpoint outputs/soft_arm/checkpoints/last/pretrained_model
    python scripts/serve_policy.py --checkpoint DIR --protocol lerobot --port 8080

`--protocol openpi` (the default): openpi's policy-server protocol, a websocket of msgpack frames
(lib/serving/openpi.py): one metadata frame on connect (the policy type, the observation keys with
their shapes and dtypes, the action chunk's shape), then one observation in, one action chunk out;
`GET /healthz`. Robot-side `openpi-client`s connect to it unchanged. `--api_key` (or the
`SERVE_API_KEY` environment variable) requires `Authorization: Api-Key <key>`.

`--protocol lerobot`: LeRobot's async inference (`lerobot.async_inference`), LeRobot's own gRPC
`PolicyServer` serving this checkpoint (lib/serving/lerobot_grpc.py); a `RobotClient` connects with
`--server_address`. Its transport unpickles what clients send: trusted networks only.

Every checkpoint kind this project writes is served with its own processors: a graph pi0
(`train_soft_arm.py`), a flag pi0 at its guidance weight (the RL trainers), an exported plain pi0
(`export_pi0.py`). The checkpoint is loaded and checked before the server listens (a damaged one
never serves). The server binds to 127.0.0.1 unless `--host` is given; on a GPU it runs in bf16
autocast. `--seed` seeds the sampling noise once, before loading (as eval_soft_arm.py does).
SIGTERM or SIGINT stops it cleanly.
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from lib.envs.soft_arm.features import GRAPH_KEY
from lib.policies.policy_fn import make_policy_fn
from lib.policies.sizes import MODEL_SIZES
from lib.run.errors import UserError, exit_code_of
from lib.serving.openpi import MAX_FRAME_BYTES, InputSpec, serve_openpi
from lib.serving.policy import load_served_policy, metadata_of

DEFAULT_PORTS = {"openpi": 8000, "lerobot": 8080}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a pretrained_model directory (or hub id)")
    parser.add_argument("--protocol", choices=sorted(DEFAULT_PORTS), default="openpi")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="default: 8000 (openpi), 8080 (lerobot); 0: any free")
    parser.add_argument("--api_key", default=os.environ.get("SERVE_API_KEY"), help="openpi protocol only")
    parser.add_argument("--max_batch", type=int, default=8, help="concurrent requests batched into one call")
    parser.add_argument("--max_frame_bytes", type=int, default=MAX_FRAME_BYTES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model_size",
        choices=MODEL_SIZES,
        default=None,
        help="the size of an exported plain pi0 (LeRobot's config names none: full unless given)",
    )
    args = parser.parse_args()
    if args.max_batch < 1:
        raise UserError(f"--max_batch must be >= 1, got {args.max_batch}")
    if args.api_key is not None and args.protocol != "openpi":
        raise UserError("--api_key is a setting of the openpi protocol; LeRobot's has none (trusted networks only)")
    return args


def serve_openpi_protocol(args: argparse.Namespace, policy, preprocessor, postprocessor) -> None:
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device == "cuda" else None
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor, autocast or contextlib.nullcontext)
    spec = InputSpec.of_policy(policy.config.input_features)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def ready(port: int) -> None:
        print(f"serving {args.checkpoint} (openpi protocol) on ws://{args.host}:{port}", flush=True)

    inference = serve_openpi(
        policy_fn,
        spec,
        metadata_of(policy),
        args.host,
        DEFAULT_PORTS["openpi"] if args.port is None else args.port,
        stop,
        args.api_key,
        args.max_batch,
        args.max_frame_bytes,
        ready,
    )
    print(f"stopped: {inference.requests} requests in {inference.calls} policy calls", flush=True)


def serve_lerobot_protocol(args: argparse.Namespace, policy, preprocessor, postprocessor) -> None:
    from lerobot.async_inference.configs import PolicyServerConfig

    from lib.serving.lerobot_grpc import admit_project_policies, make_checkpoint_policy_server, serve_lerobot

    admit_project_policies()
    port = DEFAULT_PORTS["lerobot"] if args.port is None else args.port
    # LeRobot's config refuses port 0; the gRPC server is bound by this script, not from it.
    config = PolicyServerConfig(host=args.host, port=port or DEFAULT_PORTS["lerobot"], inference_latency=0.0)
    extra_keys = (GRAPH_KEY,) if GRAPH_KEY in policy.config.input_features else ()
    server = make_checkpoint_policy_server(config, policy, preprocessor, postprocessor, extra_keys)
    grpc_server = serve_lerobot(server, args.host, port)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    print(f"serving {args.checkpoint} (lerobot protocol) on {args.host}:{grpc_server.bound_port}", flush=True)
    stopped.wait()
    server.stop()
    grpc_server.stop(grace=2).wait()
    print("stopped", flush=True)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)  # before loading, as eval_soft_arm.py: the same noise from the same seed
    policy, preprocessor, postprocessor = load_served_policy(args.checkpoint, args.device, args.model_size)
    if args.protocol == "openpi":
        serve_openpi_protocol(args, policy, preprocessor, postprocessor)
    else:
        serve_lerobot_protocol(args, policy, preprocessor, postprocessor)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
