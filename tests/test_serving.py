"""scripts/serve_policy.py with real processes on loopback: a websocket client speaking openpi's
documented encoding, and LeRobot's own client-side gRPC code, get the in-process policy's action
chunk for the same observation and noise; bad input is answered naming the field while the server
keeps serving. The codec and the input checks run in make test; the servers are `slow`."""

import asyncio
import pickle
import re
import time

import numpy as np
import pytest
import torch
from helpers import PYTHON, exit_in_process, run, train_tiny_graph_policy

from lib.serving.load import ServerProcess
from lib.serving.openpi import InputSpec, RequestError, pack, unpack

PROMPT = "touch the red ball"
START_TIMEOUT_S = 120  # a tiny checkpoint loads in seconds


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation.images.front": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation.state": rng.uniform(-0.3, 0.3, 10).astype(np.float32),
        "observation.graph": rng.normal(0, 0.1, (10, 19)).astype(np.float32),
        "prompt": PROMPT,
    }


def test_openpi_encoding_round_trips_arrays_and_refuses_objects():
    message = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, "x"], "c": np.int64(3), "d": b"raw"}
    back = unpack(pack(message))
    assert back["a"].dtype == np.float32 and back["a"].shape == (2, 3) and np.array_equal(back["a"], message["a"])
    assert back["b"] == [1, "x"] and back["c"] == 3 and back["d"] == b"raw"
    # the documented map, built by hand as another client would
    import msgpack

    frame = msgpack.packb({"x": {"__ndarray__": True, "data": b"\x01\x00", "dtype": "<u2", "shape": [1]}})
    assert unpack(frame)["x"].tolist() == [1]
    with pytest.raises(TypeError, match="numbers only"):
        pack({"x": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="numbers only"):
        unpack(msgpack.packb({"x": {"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]}}))


# One row per bad input: (what is wrong, the observation, the start of the error that names it).
GRAPH, STATE, IMAGE = "observation.graph", "observation.state", "observation.images.front"
BAD_INPUTS = [
    ("missing key", lambda o: {k: v for k, v in o.items() if k != GRAPH}, f"observation has no '{GRAPH}'"),
    ("wrong shape", lambda o: {**o, STATE: np.zeros(9, np.float32)}, f"'{STATE}' has shape [9], expected [10]"),
    ("wrong dtype", lambda o: {**o, STATE: np.zeros(10, np.float64)}, f"'{STATE}' has dtype float64, expected float32"),
    ("NaN", lambda o: {**o, GRAPH: np.full((10, 19), np.nan, np.float32)}, f"'{GRAPH}' holds NaN"),
    ("prompt type", lambda o: {**o, "prompt": 3}, "'prompt' must be a string"),
    ("not an array", lambda o: {**o, STATE: [0.0] * 10}, f"'{STATE}' must be a numpy array"),
    ("image size", lambda o: {**o, IMAGE: np.zeros((64, 64, 3), np.uint8)}, f"'{IMAGE}' has shape [64, 64, 3]"),
]


def spec() -> InputSpec:
    from lerobot.configs import FeatureType, PolicyFeature

    return InputSpec.of_policy(
        {
            "observation.images.front": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)),
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(10,)),
            "observation.graph": PolicyFeature(type=FeatureType.STATE, shape=(10, 19)),
        }
    )


@pytest.mark.parametrize(("row", "broken", "expected"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_a_bad_observation_is_named(row, broken, expected):
    with pytest.raises(RequestError) as error:
        spec().check(broken(observation()))
    assert str(error.value).startswith(expected)
    checked = spec().check(observation())
    assert checked["task"] == PROMPT and "prompt" not in checked


def in_process_chunks(checkpoint, observations: list[dict], seed: int = 0, model_size=None) -> list[np.ndarray]:
    """What the served policy answers, computed here: the same loading, the same seeded noise, one
    observation per call in order."""
    from lib.policies.policy_fn import make_policy_fn
    from lib.serving.policy import load_served_policy

    torch.manual_seed(seed)
    policy, preprocessor, postprocessor = load_served_policy(checkpoint, "cpu", model_size)
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor)
    return [
        policy_fn([{**{k: v for k, v in o.items() if k != "prompt"}, "task": o["prompt"]}])[0] for o in observations
    ]


@pytest.mark.slow  # a server process and its clients, about 40 s
def test_openpi_protocol_serves_the_in_process_chunks_and_survives_bad_clients(tiny_checkpoint):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    server = ServerProcess(
        tiny_checkpoint,
        "--api_key",
        "sesame",
        "--max_frame_bytes",
        "400000",
        "--max_batch",
        "4",
        start_timeout_s=START_TIMEOUT_S,
    )
    url, auth = f"ws://127.0.0.1:{server.port}", {"Authorization": "Api-Key sesame"}
    sequence = [observation(seed) for seed in range(3)]
    expected = in_process_chunks(tiny_checkpoint, sequence)

    async def one_client(observations: list[dict]) -> list[np.ndarray]:
        async with connect(url, additional_headers=auth, max_size=None) as websocket:
            metadata = unpack(await websocket.recv())
            assert metadata["policy_type"] == "pi0_graph" and metadata["action_shape"] == [16, 10]
            assert metadata["observation_keys"]["observation.graph"] == {"shape": [10, 19], "dtype": "float32"}
            answers = []
            for item in observations:
                await websocket.send(pack(item))
                answer = unpack(await websocket.recv())
                assert answer["server_timing"]["infer_ms"] > 0
                answers.append(answer["actions"])
            return answers

    async def refused(frame) -> tuple[str, int]:
        """The error text frame and the close code of a connection sent `frame`."""
        async with connect(url, additional_headers=auth, max_size=None) as websocket:
            await websocket.recv()  # metadata
            await websocket.send(frame)
            try:
                text = await websocket.recv()
            except ConnectionClosed as closed:  # no reply: closed before answering
                return "", closed.rcvd.code
            with pytest.raises(ConnectionClosed) as closed:
                await websocket.recv()
            return text, closed.value.rcvd.code

    async def scenario() -> None:
        # the same chunks as in process, in order, on one connection (the noise is drawn in order)
        served = await one_client(sequence)
        for got, want in zip(served, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
        # every bad input: an error frame naming the field, closed with 1011; the server goes on
        for name, broken, message in BAD_INPUTS:
            text, code = await refused(pack(broken(observation())))
            assert text.startswith(f"error: {message}"), name
            assert code == 1011, name
        text, code = await refused("a text frame")
        assert "binary msgpack frames" in text and code == 1011
        text, code = await refused(b"\xc1 not msgpack")
        assert "not msgpack of the openpi encoding" in text and code == 1011
        _, code = await refused(b"\x00" * 500_000)  # over --max_frame_bytes: websockets' own 1009
        assert code == 1009
        # no key, a wrong key: the handshake is refused (401); /healthz needs none
        for headers in ({}, {"Authorization": "Api-Key wrong"}):
            with pytest.raises(InvalidStatus, match="401"):
                async with connect(url, additional_headers=headers):
                    pass
        # a client that leaves mid-request does not stop the server
        async with connect(url, additional_headers=auth, max_size=None) as websocket:
            await websocket.recv()
            await websocket.send(pack(observation(7)))
        # several clients at once, each answered with chunks of the right shape
        answers = await asyncio.gather(*(one_client([observation(10 + i)] * 2) for i in range(4)))
        assert all(chunk.shape == (16, 10) and np.isfinite(chunk).all() for pair in answers for chunk in pair)

    asyncio.run(scenario())
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
        assert response.status == 200
    summary = server.stop()
    requests, calls = map(int, re.search(r"stopped: (\d+) requests in (\d+) policy calls", summary).groups())
    assert requests >= 3 + 8 and calls <= requests  # concurrent requests may share a call


@pytest.mark.slow  # a server process and LeRobot's client stubs, about 30 s
def test_lerobot_protocol_serves_our_plugin_policy_to_lerobots_client_code(tiny_checkpoint):
    import grpc
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import send_bytes_in_chunks
    from lerobot.utils.feature_utils import hw_to_dataset_features

    server = ServerProcess(tiny_checkpoint, "--protocol", "lerobot", start_timeout_s=START_TIMEOUT_S)
    item = observation(0)
    expected = in_process_chunks(tiny_checkpoint, [item])[0]
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    stub.Ready(services_pb2.Empty())
    # what a RobotClient sends: its hardware features as LeRobot names them, then raw observations
    hardware = {f"cable_{i}": float for i in range(10)} | {"front": (224, 224, 3)}
    features = hw_to_dataset_features(hardware, "observation", use_video=False)
    setup = RemotePolicyConfig("pi0_graph", str(tiny_checkpoint), features, 16, "cpu")
    stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(setup)))
    raw = {f"cable_{i}": float(v) for i, v in enumerate(item["observation.state"])}
    raw |= {"front": item["observation.images.front"], "task": PROMPT, "observation.graph": item["observation.graph"]}
    timed = TimedObservation(timestamp=time.time(), timestep=0, observation=raw, must_go=True)
    stub.SendObservations(send_bytes_in_chunks(pickle.dumps(timed), services_pb2.Observation))
    chunk = pickle.loads(stub.GetActions(services_pb2.Empty()).data)
    served = torch.stack([action.get_action() for action in chunk]).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # another policy type than the served checkpoint's is refused
    other = RemotePolicyConfig("act", str(tiny_checkpoint), features, 16, "cpu")
    with pytest.raises(grpc.RpcError):
        stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(other)))
    channel.close()
    assert "stopped" in server.stop()


def test_a_checkpoint_that_fails_the_load_check_never_serves(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "pretrained_model"
    bad.mkdir()
    (bad / "config.json").write_text('{"type": "pi0_graph"}')
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    code, error = exit_in_process(monkeypatch, capsys, "scripts/serve_policy.py", "--checkpoint", str(bad))
    assert code == 2 and "Traceback" not in error, error
    assert f"{bad / 'model.safetensors'} is truncated or corrupt" in error


@pytest.mark.slow  # a server process and two evaluations, about 60 s
def test_a_closed_loop_through_the_server_scores_what_eval_scores(tiny_checkpoint, tmp_path):
    """The robot's view: eval_soft_arm.py --server steps the simulated arm and asks the server for
    every chunk; the same seeds and noise give the same episodes as the in-process evaluation."""
    import json

    server = ServerProcess(tiny_checkpoint, start_timeout_s=START_TIMEOUT_S)
    episodes = ["--num_episodes", "3", "--num_envs", "1", "--max_steps", "8", "--replan_steps", "4", "--videos", "0"]
    summaries = {}
    for name, source in (
        ("local", ["--checkpoint", str(tiny_checkpoint)]),
        ("served", ["--server", f"ws://127.0.0.1:{server.port}"]),
    ):
        run([PYTHON, "scripts/eval_soft_arm.py", *source, *episodes, "--output_dir", str(tmp_path / name)])
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())["per_episode"]
    server.stop()
    assert [e["seed"] for e in summaries["served"]] == [e["seed"] for e in summaries["local"]]
    for served, local in zip(summaries["served"], summaries["local"], strict=True):
        assert served["success"] == local["success"] and served["length"] == local["length"]
        assert served["final_distance_m"] == pytest.approx(local["final_distance_m"], abs=1e-4)


@pytest.fixture(scope="module")
def flag_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The 2-step graph policy as the RL trainers save it: a flag pi0 at guidance weight 2 (its flag
    embedding random, so that the two branches differ), with the source's processors and tokenizer."""
    import shutil

    from lerobot.configs import PreTrainedConfig

    from lib.policies.flag_pi0 import PI0GraphCFGConfig, PI0GraphCFGPolicy
    from lib.policies.loading import load_pretrained_policy

    config = PI0GraphCFGConfig.from_config(PreTrainedConfig.from_pretrained(tiny_checkpoint))
    config.guidance_weight = 2.0
    policy = load_pretrained_policy(tiny_checkpoint, PI0GraphCFGPolicy, config)
    torch.manual_seed(1)
    torch.nn.init.normal_(policy.model.condition_embedding.weight, std=0.5)
    directory = tmp_path_factory.mktemp("flag") / "pretrained_model"
    policy.save_pretrained(directory)
    for file in tiny_checkpoint.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, directory / file.name)
    return directory


@pytest.mark.slow  # a server process, about 25 s
def test_a_flag_policy_is_served_at_its_guidance_weight(flag_checkpoint):
    from websockets.sync.client import connect

    server = ServerProcess(flag_checkpoint, start_timeout_s=START_TIMEOUT_S)
    item = observation(3)
    expected = in_process_chunks(flag_checkpoint, [item])[0]
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as websocket:
        metadata = unpack(websocket.recv())
        assert metadata["policy_type"] == "pi0_graph_cfg" and metadata["guidance_weight"] == 2.0
        websocket.send(pack(item))
        np.testing.assert_allclose(unpack(websocket.recv())["actions"], expected, atol=1e-5)
    server.stop()


@pytest.mark.slow  # a 2-step training, an export and a server process, about 60 s
def test_an_exported_plain_pi0_is_served(tmp_path, tokenizer_dir, dataset_dir):
    """export_pi0.py's plain LeRobot pi0 (from a graph-free graph policy), served: its config names
    no size, so a tiny one is served with --model_size tiny (and refused as another size)."""
    from websockets.sync.client import connect

    checkpoint = train_tiny_graph_policy(tmp_path / "train", tokenizer_dir, dataset_dir, "model.use_graph=false")
    plain = tmp_path / "plain"
    run([PYTHON, "scripts/export_pi0.py", "--checkpoint", str(checkpoint), "--output_dir", str(plain)])
    server = ServerProcess(plain, "--model_size", "tiny", start_timeout_s=START_TIMEOUT_S)
    item = observation(4)
    expected = in_process_chunks(plain, [item], model_size="tiny")[0]
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as websocket:
        assert unpack(websocket.recv())["policy_type"] == "pi0"
        websocket.send(pack(item))
        np.testing.assert_allclose(unpack(websocket.recv())["actions"], expected, atol=1e-5)
    server.stop()
    refused = run(
        [PYTHON, "scripts/serve_policy.py", "--checkpoint", str(checkpoint), "--model_size", "small"], check=False
    )
    assert refused.returncode == 2 and "holds a 'tiny' policy, not 'small'" in refused.stderr
