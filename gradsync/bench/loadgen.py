"""The closed-loop HTTP load generator of `gradsync bench serve`: asyncio, raw keep-alive
connections, requests encoded once.

    result = run_closed_loop("127.0.0.1", 8000, "/v2/models/m/infer", bodies, warmup=2,
                             duration=10, sample=cpu_split)

Each client is a coroutine on one connection: it writes its request (built once, bytes) and
reads the answer (the head up to the blank line, then Content-Length bytes), and sends the
next. An event loop on one thread costs the generator far less CPU per request than threads
around ``http.client`` (which parses every header through the email package and contends
for the GIL): on a 2-core machine the generator shares the cores with the server it loads,
and its own cost must not decide what the server seems to manage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoadError(Exception):
    """A client got an answer other than 200, or lost its connection (one line)."""


def _request(host: str, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> int:
    """Read one response; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    await reader.readexactly(length)
    return status


async def _client(host: str, port: int, request: bytes, warm_until: float, stop_at: float,
                  latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (start := time.monotonic()) < stop_at:
            writer.write(request)
            status = await _answer(reader)
            if status != 200:
                raise LoadError(f"HTTP {status}")
            if start >= warm_until:
                latencies.append(time.monotonic() - start)
    finally:
        writer.close()


async def _sampler(sample: Callable[[], None], times: tuple[float, ...]) -> None:
    for at in times:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sample()


async def _main(host, port, path, bodies, warmup, duration, sample) -> list[float]:
    warm_until = time.monotonic() + warmup
    stop_at = warm_until + duration
    latencies: list[float] = []
    tasks = [_client(host, port, _request(host, path, body), warm_until, stop_at, latencies)
             for body in bodies]
    if sample is not None:
        tasks.append(_sampler(sample, (warm_until, stop_at)))
    await asyncio.gather(*tasks)
    return latencies


def run_closed_loop(host: str, port: int, path: str, bodies: list[bytes], *, warmup: float,
                    duration: float, sample: Callable[[], None] | None = None) -> dict:
    """One client per body, for ``warmup`` seconds not counted then ``duration`` counted;
    requests/s and the p50/p99 latency in ms. ``sample()`` is called when the counted
    seconds begin and when they end.

    Raises:
        LoadError: a client failed (its first error).
    """
    try:
        import uvloop  # the server's loop too, when installed (the `serve` extra)
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        every = sorted(runner(_main(host, port, path, bodies, warmup, duration, sample)))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise LoadError(f"{type(exc).__name__}: {exc}") from None
    if not every:
        raise LoadError("no request completed in the measured seconds")
    return {"requests_per_s": len(every) / duration,
            "p50_ms": 1e3 * every[len(every) // 2],
            "p99_ms": 1e3 * every[min(len(every) - 1, int(len(every) * 0.99))],
            "requests": len(every)}
