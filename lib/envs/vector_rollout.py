"""What every simulator's rollouts share: the policy-call record (`Window`), and `VectorRollout`,
simulators in worker processes stepped in parallel behind one batched policy call per round, with
dead or hung simulators replaced and their episodes re-run.

This module imports no torch: the simulator workers import it (`serve_simulator`), and each is a
fresh interpreter whose start-up should cost the simulator's imports only.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_PREFIX = "observation.images."


@dataclass
class PolicyOutput:
    """Action chunks (n, chunk, action_dim) plus, per row, what the RL update needs of how they
    were sampled (e.g. Flow-Noise's denoising chain and step log-probabilities)."""

    actions: np.ndarray
    extras: list[dict[str, np.ndarray]]


# Observations in; action chunks (n, chunk, action_dim) out, or a `PolicyOutput`.
PolicyFn = Callable[[list[dict[str, Any]]], "np.ndarray | PolicyOutput"]


class TimedPolicy:
    """A policy function that adds up the wall time spent in its calls: a rollout's inference share
    (the rest of a rollout is simulation). Its calls return host arrays, so the time includes the
    device's work."""

    def __init__(self, policy_fn: PolicyFn) -> None:
        self.policy_fn = policy_fn
        self.seconds = 0.0

    def __call__(self, observations: list[dict[str, Any]]) -> np.ndarray | PolicyOutput:
        started = time.perf_counter()
        try:
            return self.policy_fn(observations)
        finally:
            self.seconds += time.perf_counter() - started

    def pop_seconds(self) -> float:
        """The seconds since the last call of this method."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def split_policy_output(output: np.ndarray | PolicyOutput) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """(float32 chunks, per-row extras) of a policy function's answer."""
    if isinstance(output, PolicyOutput):
        return np.asarray(output.actions, dtype=np.float32), output.extras
    chunks = np.asarray(output, dtype=np.float32)
    return chunks, [{} for _ in range(len(chunks))]


@dataclass
class Window:
    """One policy call of an episode: what it saw and the chunk it produced (first `executed`
    actions were run in the simulator)."""

    observation: dict[str, Any]
    actions: np.ndarray
    executed: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # see PolicyOutput


class VectorRollout:
    """`num_envs` simulators, each a worker process, behind `run(requests, policy_fn)`: one
    episode per request, results in request order.

    Each round sends every running simulator its step first and reads the answers after, so the
    simulators step in parallel, with one batched `policy_fn` call per round; each simulator runs
    up to `replan_steps` actions of its chunk. A worker is a fresh interpreter
    (`python -m <worker_module> <fd> <worker_arguments>`, never a fork of a process holding torch
    or a GL context) that answers over a private socket pair (`serve_simulator`) and ends on
    "close" or when this process is gone. A worker that dies, fails or gives no answer within
    `worker_timeout_s` is replaced (`worker_restarts`) and its episode re-run from its start, up
    to `max_retries` times (then it counts as a failure). An episode must depend only on its
    request and the policy, so a re-run one is the episode that would have run.

    Subclasses say what a reset and a step send and how the answers fill the episode's result
    (`new_result`, `reset_message`, `begin`, `advance`); a result has `success`, `length`,
    `windows`, `frames` and `retries`.
    """

    worker_module: str

    def __init__(
        self,
        worker_arguments: list[Any],
        num_envs: int,
        replan_steps: int,
        max_steps: int,
        worker_timeout_s: float,
        max_retries: int,
    ) -> None:
        self.worker_arguments = [str(argument) for argument in worker_arguments]
        self.replan_steps = replan_steps
        self.max_steps = max_steps
        self.worker_timeout_s = worker_timeout_s
        self.max_retries = max_retries
        self.worker_restarts = 0
        self._workers: list[tuple[subprocess.Popen, Connection] | None] = [None] * num_envs
        for index in range(num_envs):
            self._start_worker(index)

    # -- what a subclass says about its simulator --------------------------------------------

    def new_result(self, request: dict[str, Any]) -> Any:
        raise NotImplementedError

    def reset_message(self, request: dict[str, Any]) -> tuple:
        raise NotImplementedError

    def begin(self, result: Any, answer: Any, record: bool) -> dict[str, Any]:
        """The episode's first observation for the policy (with `task`), from the reset's answer."""
        raise NotImplementedError

    def advance(self, result: Any, answer: Any) -> tuple[dict[str, Any], bool, int]:
        """(next observation, success, actions executed) from a step's answer; records the
        step's frames and anything else the result keeps."""
        raise NotImplementedError

    # -- the workers ---------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        return [worker[0].pid for worker in self._workers if worker is not None]

    def _start_worker(self, index: int) -> None:
        parent, child = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", self.worker_module, str(child.fileno()), *self.worker_arguments],
            pass_fds=(child.fileno(),),
        )
        child.close()
        self._workers[index] = (process, Connection(parent.detach()))

    def _restart_worker(self, index: int) -> None:
        process, connection = self._workers[index]
        process.kill()
        process.wait(timeout=10)
        connection.close()
        self.worker_restarts += 1
        self._start_worker(index)

    def _send(self, index: int, message: tuple) -> None:
        """Hand a worker its next request without waiting; `RuntimeError` if it is gone."""
        process, connection = self._workers[index]
        try:
            connection.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as error:
            raise RuntimeError(f"simulator worker {index} died ({error!r}, exit code {process.poll()})") from error

    def _receive(self, index: int) -> Any:
        """A worker's answer to its request; `RuntimeError` if it died, hung or failed."""
        process, connection = self._workers[index]
        try:
            if not connection.poll(self.worker_timeout_s):
                raise RuntimeError(f"simulator worker {index} gave no answer in {self.worker_timeout_s:.0f} s")
            status, payload = connection.recv()
        except (EOFError, ConnectionResetError, OSError) as error:
            raise RuntimeError(f"simulator worker {index} died ({error!r}, exit code {process.poll()})") from error
        if status != "ok":
            raise RuntimeError(f"simulator worker {index} failed:\n{payload}")
        return payload

    # -- the rollouts --------------------------------------------------------------------------

    def run(
        self,
        requests: list[dict[str, Any]],
        policy_fn: PolicyFn,
        record_frames: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[Any]:
        """Every request's episode, in order. A request's `record` (else `record_frames`) keeps
        its frames. The policy sees each observation with `task`, `episode` (the request's index)
        and `attempt` (0, or the re-runs after a simulator failure)."""
        results = [self.new_result(request) for request in requests]
        pending = deque(range(len(requests)))
        active: dict[int, tuple[int, dict[str, Any]]] = {}  # worker -> (episode, last observation)

        def record(episode: int) -> bool:
            return bool(requests[episode].get("record", record_frames))

        def fail(worker: int, episode: int) -> None:
            """Replace the worker; run the episode again unless it failed `max_retries` times."""
            self._restart_worker(worker)
            results[episode].retries += 1
            if results[episode].retries <= self.max_retries:
                pending.appendleft(episode)
            else:
                results[episode].success = False
                if progress is not None:
                    progress(1)

        def start_episodes(idle: list[int]) -> None:
            """Reset each idle worker (in order) to the next pending episode, all in parallel."""
            while idle and pending:
                resetting = []
                for worker in idle:
                    if not pending:
                        break
                    episode = pending.popleft()
                    try:
                        self._send(worker, self.reset_message(requests[episode]))
                        resetting.append((worker, episode))
                    except RuntimeError:
                        fail(worker, episode)
                        resetting.append((worker, None))  # the restarted worker takes the next one
                idle = []
                for worker, episode in resetting:
                    if episode is None:
                        idle.append(worker)
                        continue
                    try:
                        answer = self._receive(worker)
                    except RuntimeError:
                        fail(worker, episode)
                        idle.append(worker)
                        continue
                    result = self.new_result(requests[episode])  # a re-run starts from nothing
                    result.retries = results[episode].retries
                    results[episode] = result
                    observation = self.begin(result, answer, record(episode))
                    active[worker] = (episode, {**observation, "episode": episode, "attempt": result.retries})

        start_episodes(list(range(len(self._workers))))
        while active:
            workers = sorted(active)
            chunks, extras = split_policy_output(policy_fn([active[w][1] for w in workers]))
            stepping, idle = [], []
            for worker, chunk, extra in zip(workers, chunks, extras, strict=True):
                episode, observation = active.pop(worker)
                steps = min(self.replan_steps, self.max_steps - results[episode].length, len(chunk))
                try:
                    self._send(worker, ("step", np.clip(chunk[:steps], -1.0, 1.0), record(episode)))
                    stepping.append((worker, episode, observation, chunk, extra))
                except RuntimeError:
                    fail(worker, episode)
                    idle.append(worker)
            for worker, episode, observation, chunk, extra in stepping:
                result = results[episode]
                try:
                    next_observation, success, executed = self.advance(result, self._receive(worker))
                except RuntimeError:
                    fail(worker, episode)
                    idle.append(worker)
                    continue
                result.windows.append(Window(observation, chunk, executed, extra))
                result.length += executed
                if success or result.length >= self.max_steps:
                    result.success = success
                    if progress is not None:
                        progress(1)
                    idle.append(worker)
                else:
                    active[worker] = (episode, {**observation, **next_observation})
            start_episodes(sorted(idle))
        return results

    def close(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker is None:
                continue
            process, connection = worker
            with contextlib.suppress(BrokenPipeError, OSError):
                connection.send(("close",))
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            connection.close()
            self._workers[index] = None

    def __enter__(self) -> VectorRollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_simulator(connection: Connection, handle: Callable[[str, tuple], Any]) -> None:
    """A simulator worker's loop: each `(command, *payload)` is answered `("ok", handle(command,
    payload))`, or `("error", traceback)` when it raises (the parent replaces the worker), until
    `("close",)` or the parent is gone."""
    try:
        while True:
            command, *payload = connection.recv()
            if command == "close":
                break
            try:
                connection.send(("ok", handle(command, tuple(payload))))
            except Exception:
                connection.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass


def save_rollout_video(results: list[Any], directory: Path, iteration: int, fps: int = 20) -> Path | None:
    """The first recorded episode of `results` as `directory/iteration_<N>_<success|failure>.mp4`."""
    from lerobot.utils.io_utils import write_video

    recorded = next((r for r in results if r.frames), None)
    if recorded is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"iteration_{iteration:05d}_{'success' if recorded.success else 'failure'}.mp4"
    write_video(path, recorded.frames, fps)
    return path
