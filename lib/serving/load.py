"""Load on a served checkpoint: `scripts/serve_policy.py` started on a free loopback port, and
concurrent openpi-protocol clients timing their round trips. What `make bench` (CPU) and
`make gpu-check` (one GPU) measure against the in-process policy call."""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lib.serving.openpi import unpack

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`serve_policy.py --checkpoint checkpoint --port 0 *arguments` in its own process (either
    protocol); the constructor returns once it listens, with the port it bound in `port`. With
    `start_timeout_s`, a server that prints a line later than that without listening is killed and
    raises (checked as lines arrive)."""

    def __init__(self, checkpoint: Path, *arguments: str, start_timeout_s: float | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "scripts/serve_policy.py", "--checkpoint", str(checkpoint), "--port", "0", *arguments],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        deadline = None if start_timeout_s is None else time.monotonic() + start_timeout_s
        for line in self.process.stdout:
            self.output.append(line)
            found = re.search(r"^serving .* on (?:ws://)?127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                return
            if deadline is not None and time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(
                    f"serve_policy.py did not listen within {start_timeout_s:.0f} s:\n" + "".join(self.output[-20:])
                )
        self.process.wait()
        raise RuntimeError("serve_policy.py exited before it listened:\n" + "".join(self.output[-20:]))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> str:
        """SIGTERM, then what the server printed after it listened; a server that does not exit 0
        raises with its whole output."""
        self.process.terminate()
        rest, _ = self.process.communicate(timeout=60)
        if self.process.returncode != 0:
            raise RuntimeError(
                f"serve_policy.py exited {self.process.returncode} on SIGTERM:\n" + "".join(self.output) + rest
            )
        return rest


@contextmanager
def served_checkpoint(checkpoint: Path, *arguments: str) -> Iterator[str]:
    """A `ServerProcess` for the length of the block; yields its websocket URL."""
    server = ServerProcess(checkpoint, *arguments)
    try:
        yield server.url
    finally:
        server.stop()


async def _client(url: str, message: bytes, latencies: list[float], count: int) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as websocket:
        await websocket.recv()  # the metadata frame
        for _ in range(count):
            started = time.perf_counter()
            await websocket.send(message)
            unpack(await websocket.recv())
            latencies.append(time.perf_counter() - started)


def round_trips(url: str, message: bytes, clients: int, requests: int) -> dict[str, float]:
    """`clients` concurrent connections sharing about `requests` round trips of `message` (a packed
    observation): p50/p99 latency and requests/s over the whole load."""
    latencies: list[float] = []
    count = max(2, requests // clients)

    async def load() -> None:
        await asyncio.gather(*(_client(url, message, latencies, count) for _ in range(clients)))

    started = time.perf_counter()
    asyncio.run(load())
    return {
        "p50_s": statistics.median(latencies),
        "p99_s": float(np.quantile(latencies, 0.99)),
        "requests_per_s": clients * count / (time.perf_counter() - started),
    }


def warm_up(url: str, message: bytes) -> None:
    """Two round trips, so the first measured one does not pay for the server's first call."""
    asyncio.run(_client(url, message, [], 2))
