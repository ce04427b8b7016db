"""The openpi policy-server protocol (what openpi's `serve_policy.py` speaks and `openpi-client`
connects to), served for this project's checkpoints.

A websocket; on connect the server sends one metadata frame, then every binary frame the client
sends is one observation and the server answers one action frame. Frames are msgpack with numpy
arrays as maps `{"__ndarray__": True, "data": bytes, "dtype": str, "shape": list}` (`pack`,
`unpack`). An action frame holds `actions` (chunk, action_dim) float32 and
`server_timing: {"infer_ms": ...}`. `GET /healthz` answers 200. A request that cannot be served
gets a text frame naming the problem and the socket is closed with code 1011 (the server goes on
serving everyone else). Nothing a client sends is ever unpickled: msgpack carries data only.

Observation keys are the policy's own feature names (the metadata frame lists them with shapes
and dtypes): `observation.images.<camera>` HxWx3 uint8, `observation.state` and, for a graph
policy, `observation.graph` float32, and `prompt`, the instruction string.
"""

from __future__ import annotations

import asyncio
import http
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

NDARRAY = "__ndarray__"
PROMPT_KEY = "prompt"
MAX_FRAME_BYTES = 16 * 2**20  # a few 224 px camera frames fit many times over


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"arrays of dtype {value.dtype} are not sent (numbers only)")
        return {NDARRAY: True, "data": value.tobytes(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: dict) -> Any:
    if value.get(NDARRAY) is True:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"arrays of dtype {dtype} are not accepted (numbers only)")
        return np.frombuffer(value["data"], dtype=dtype).reshape(value["shape"])
    return value


def pack(message: Any) -> bytes:
    """A message (dicts, lists, strings, numbers, numpy arrays) as one msgpack frame."""
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """One msgpack frame back to the message, numpy arrays included (read-only views of the frame)."""
    return msgpack.unpackb(frame, object_hook=_decode, raw=False, strict_map_key=False)


class RequestError(ValueError):
    """An observation the policy cannot take; the message names the field and what was expected."""


@dataclass(frozen=True)
class InputSpec:
    """What one observation must hold: each array key with its shape and dtype, and the prompt."""

    arrays: dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype); images are HxWx3 uint8

    @classmethod
    def of_policy(cls, input_features: dict[str, Any]) -> InputSpec:
        """A policy's input features: a (3, H, W) image as the HxWx3 uint8 a camera sends, the rest
        float32 of the feature's shape."""
        arrays = {}
        for key, feature in input_features.items():
            if key.startswith("observation.images."):
                _, height, width = feature.shape
                arrays[key] = ((height, width, 3), "uint8")
            else:
                arrays[key] = (tuple(feature.shape), "float32")
        return cls(arrays)

    def metadata(self) -> dict[str, Any]:
        return {
            "observation_keys": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.arrays.items()},
            "prompt_key": PROMPT_KEY,
        }

    def check(self, observation: Any) -> dict[str, Any]:
        """The observation as the simulators' policy function takes it, or a `RequestError`."""
        if not isinstance(observation, dict):
            raise RequestError(f"an observation is a map of keys to values, got {type(observation).__name__}")
        checked: dict[str, Any] = {}
        for key, (shape, dtype) in self.arrays.items():
            if key not in observation:
                raise RequestError(f"observation has no '{key}' (expected {dtype} of shape {list(shape)})")
            value = observation[key]
            if not isinstance(value, np.ndarray):
                raise RequestError(
                    f"'{key}' must be a numpy array ({dtype}, shape {list(shape)}), got {type(value).__name__}"
                )
            if value.dtype != np.dtype(dtype):
                raise RequestError(f"'{key}' has dtype {value.dtype}, expected {dtype}")
            if value.shape != shape:
                raise RequestError(f"'{key}' has shape {list(value.shape)}, expected {list(shape)}")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise RequestError(f"'{key}' holds NaN or infinite values")
            checked[key] = value
        prompt = observation.get(PROMPT_KEY)
        if not isinstance(prompt, str):
            raise RequestError(f"'{PROMPT_KEY}' must be a string (the instruction), got {type(prompt).__name__}")
        checked["task"] = prompt
        return checked


class BatchingInference:
    """Runs the policy function on the thread that calls `run` (the main thread: PyTorch's CPU
    kernels run half as fast from a second thread, whose OpenMP team competes with the main
    thread's spinning one), fed by the server's event loop in another thread. Requests that wait
    while a call runs are taken together into the next call (up to `max_batch`): concurrent clients
    share one batched forward. `max_batch=1` serves them one by one."""

    def __init__(self, policy_fn: Callable[[list[dict[str, Any]]], np.ndarray], max_batch: int) -> None:
        self.policy_fn, self.max_batch = policy_fn, max_batch
        self.pending: queue.Queue[tuple[dict[str, Any], asyncio.AbstractEventLoop, asyncio.Future]] = queue.Queue()
        self.calls = self.requests = 0

    async def __call__(self, observation: dict[str, Any]) -> tuple[np.ndarray, float]:
        """One observation's action chunk and the milliseconds of the policy call that made it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.put((observation, loop, done))
        return await done

    def run(self, stop: threading.Event) -> None:
        """Serve the queued requests until `stop` is set."""

        def resolve(done: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
            if done.done():  # the client went away meanwhile
                return
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)

        def answer(loop: asyncio.AbstractEventLoop, *args: Any) -> None:
            if not loop.is_closed():  # closed: the server stopped while this call ran, nobody waits
                loop.call_soon_threadsafe(resolve, *args)

        while not stop.is_set():
            try:
                batch = [self.pending.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            started = time.perf_counter()
            try:
                chunks = np.asarray(self.policy_fn([observation for observation, _, _ in batch]), dtype=np.float32)
            except Exception as error:  # the policy failed on this batch: each waiting request learns why
                for _, loop, done in batch:
                    answer(loop, done, None, error)
                continue
            infer_ms = 1000 * (time.perf_counter() - started)
            self.calls, self.requests = self.calls + 1, self.requests + len(batch)
            for (_, loop, done), chunk in zip(batch, chunks, strict=True):
                answer(loop, done, (chunk, infer_ms))


def authorized(request_headers: Any, api_key: str | None) -> bool:
    """openpi-client's header: `Authorization: Api-Key <key>`."""
    return api_key is None or request_headers.get("Authorization") == f"Api-Key {api_key}"


def serve_openpi(
    policy_fn: Callable[[list[dict[str, Any]]], np.ndarray],
    spec: InputSpec,
    metadata: dict[str, Any],
    host: str,
    port: int,
    stop: threading.Event,
    api_key: str | None = None,
    max_batch: int = 8,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    ready: Callable[[int], None] | None = None,
) -> BatchingInference:
    """Serve until `stop` is set: the websocket server on an event loop in a second thread, the
    policy on this one. `ready(port)` is called once listening (port 0: any free one)."""
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    inference = BatchingInference(policy_fn, max_batch)
    metadata = {**metadata, **spec.metadata()}
    failed: list[BaseException] = []

    def process_request(connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if not authorized(request.headers, api_key):
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "an Api-Key Authorization header is required\n")
        return None

    async def handler(websocket: Any) -> None:
        try:
            await websocket.send(pack(metadata))
            async for frame in websocket:
                try:
                    if isinstance(frame, str):
                        raise RequestError("observations are binary msgpack frames, got a text frame")
                    try:
                        message = unpack(frame)
                    except Exception as error:
                        raise RequestError(f"the frame is not msgpack of the openpi encoding ({error})") from error
                    observation = spec.check(message)
                    chunk, infer_ms = await inference(observation)
                except RequestError as error:
                    await websocket.send(f"error: {error}")
                    await websocket.close(1011, str(error)[:120])
                    return
                await websocket.send(pack({"actions": chunk, "server_timing": {"infer_ms": infer_ms}}))
        except ConnectionClosed:  # the client went away, mid-request or between requests
            return

    async def listen() -> None:
        async with serve(
            handler, host, port, process_request=process_request, max_size=max_frame_bytes, compression=None
        ) as server:
            if ready is not None:
                ready(server.sockets[0].getsockname()[1])
            while not stop.is_set():
                await asyncio.sleep(0.1)

    def server_thread() -> None:
        try:
            asyncio.run(listen())
        except BaseException as error:  # cannot listen (say, the port is taken): the main thread raises it
            failed.append(error)
            stop.set()

    thread = threading.Thread(target=server_thread, name="openpi-server", daemon=True)
    thread.start()
    inference.run(stop)
    thread.join(timeout=10)
    if failed:
        raise failed[0]
    return inference


def request_frame(observation: dict[str, Any], keys: list[str] | None = None) -> bytes:
    """The frame a client sends for one observation in the simulators' format (`task`: the
    instruction): its policy inputs (`keys`, or every key but `task`) and the instruction as `prompt`."""
    keys = [key for key in observation if key != "task"] if keys is None else keys
    return pack({**{key: observation[key] for key in keys}, PROMPT_KEY: observation["task"]})


def remote_policy_fn(url: str, api_key: str | None = None, timeout_s: float = 60.0) -> Callable:
    """The robot side: a policy function (observations in the simulators' format, as
    `lib.policies.policy_fn.make_policy_fn` takes them) that asks an openpi-protocol server, one
    request per observation, in order. A server's error frame is raised as a `RequestError`."""
    from websockets.sync.client import connect

    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    websocket = connect(url, additional_headers=headers, max_size=None, open_timeout=timeout_s)
    metadata = unpack(websocket.recv(timeout=timeout_s))
    keys = list(metadata["observation_keys"])

    def policy_fn(observations: list[dict[str, Any]]) -> np.ndarray:
        chunks = []
        for observation in observations:
            websocket.send(request_frame(observation, keys))
            answer = websocket.recv(timeout=timeout_s)
            if isinstance(answer, str):
                raise RequestError(f"the server at {url} answered: {answer}")
            chunks.append(unpack(answer)["actions"])
        return np.stack(chunks)

    policy_fn.metadata, policy_fn.close = metadata, websocket.close
    return policy_fn
