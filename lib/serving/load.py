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


@contextmanager
def served_checkpoint(checkpoint: Path, *arguments: str) -> Iterator[str]:
    """`serve_policy.py --checkpoint checkpoint --port 0 *arguments` in its own process; yields its
    websocket URL once it listens, and stops it with SIGTERM on exit."""
    server = subprocess.Popen(
        [sys.executable, "scripts/serve_policy.py", "--checkpoint", str(checkpoint), "--port", "0", *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = []
        for line in server.stdout:
            output.append(line)
            found = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
            if found:
                break
        else:
            raise RuntimeError("serve_policy.py exited before it listened:\n" + "".join(output[-20:]))
        yield f"ws://127.0.0.1:{found.group(1)}"
    finally:
        server.terminate()
        server.communicate(timeout=60)


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
