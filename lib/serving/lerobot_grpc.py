"""LeRobot's async-inference protocol (`lerobot.async_inference`: a gRPC `PolicyServer`, a
`RobotClient` on the robot), served for this project's checkpoints.

LeRobot's own `PolicyServer` runs the protocol; two things are added around it, both through
LeRobot's public objects:
- admission: LeRobot's server accepts only the types in `async_inference.constants.SUPPORTED_POLICIES`
  and never registers third-party plugins. `admit_project_policies` registers them
  (`register_third_party_plugins`) and appends this project's types to that list;
- the served checkpoint: LeRobot's server loads whatever path the client names, with LeRobot's
  loader (which prints load errors and goes on with random weights). `CheckpointPolicyServer`
  serves the one checkpoint it was started with, loaded and checked before the server listens;
  a client that asks for another policy type is refused. Observation keys LeRobot's conversion
  does not carry (the soft arm's `observation.graph`) are taken from the raw observation.

LeRobot's transport pickles what the client sends and the server unpickles it: anyone who can
connect can run code on the server. This protocol is for trusted networks only (docs/serving.md);
the websocket protocol (lib/serving/openpi.py) never unpickles.
"""

from __future__ import annotations

import pickle  # nosec: LeRobot's transport; see the module docstring
from typing import Any

import numpy as np
import torch

PROJECT_POLICY_TYPES = ("pi0_graph", "pi0_cfg", "pi0_graph_cfg")


def admit_project_policies() -> None:
    """Make LeRobot's policy server accept this project's policy types."""
    from lerobot.async_inference import constants
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    for policy_type in PROJECT_POLICY_TYPES:
        if policy_type not in constants.SUPPORTED_POLICIES:
            constants.SUPPORTED_POLICIES.append(policy_type)


def make_checkpoint_policy_server(
    config: Any, policy: Any, preprocessor: Any, postprocessor: Any, extra_keys: tuple[str, ...]
) -> Any:
    """A LeRobot `PolicyServer` (built on `config`, a `PolicyServerConfig`) that serves `policy` with
    its processors; `extra_keys` are the observation arrays taken from the raw observation."""
    from lerobot.async_inference.constants import SUPPORTED_POLICIES
    from lerobot.async_inference.helpers import RemotePolicyConfig
    from lerobot.async_inference.policy_server import PolicyServer
    from lerobot.transport import services_pb2

    class CheckpointPolicyServer(PolicyServer):
        def SendPolicyInstructions(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
            if not self.running:
                return services_pb2.Empty()
            specs = pickle.loads(request.data)  # nosec: LeRobot's transport, trusted networks only
            if not isinstance(specs, RemotePolicyConfig):
                raise TypeError(f"policy instructions must be a RemotePolicyConfig, got {type(specs).__name__}")
            if specs.policy_type not in SUPPORTED_POLICIES or specs.policy_type != policy.config.type:
                raise ValueError(
                    f"this server serves one {policy.config.type!r} checkpoint; the client asked for "
                    f"{specs.policy_type!r}"
                )
            self.logger.info(
                f"client {context.peer()} asked for {specs.pretrained_name_or_path}: serving the started checkpoint"
            )
            self.device, self.policy_type = policy.config.device, specs.policy_type
            self.lerobot_features, self.actions_per_chunk = specs.lerobot_features, specs.actions_per_chunk
            self.policy, self.postprocessor = policy, postprocessor
            self.preprocessor = self._with_extras
            return services_pb2.Empty()

        def _with_extras(self, observation: dict[str, Any]) -> dict[str, Any]:
            return preprocessor({**observation, **self._extras})

        def _predict_action_chunk(self, observation_t: Any) -> Any:
            raw = observation_t.get_observation()
            missing = [key for key in extra_keys if key not in raw]
            if missing:
                raise ValueError(f"the observation has no {missing}, which the policy takes")
            self._extras = {key: torch.from_numpy(np.asarray(raw[key], dtype=np.float32))[None] for key in extra_keys}
            with torch.no_grad():
                return super()._predict_action_chunk(observation_t)

    return CheckpointPolicyServer(config)


def serve_lerobot(server: Any, host: str, port: int, workers: int = 4) -> Any:
    """The gRPC server of `server` (a `PolicyServer`), started on host:port; returns it (`stop()`)."""
    from concurrent import futures

    import grpc
    from lerobot.transport import services_pb2_grpc

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(server, grpc_server)
    bound = grpc_server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    grpc_server.start()
    grpc_server.bound_port = bound
    return grpc_server
