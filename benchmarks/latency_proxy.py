"""A TCP proxy on loopback that delays every chunk by a fixed time in each direction.

A NetHSM appliance is across a network: every request pays the round trip,
which a sequential client pays in full per operation and a concurrent one
overlaps. ``tc netem`` is not available on these machines, so this proxy
stands in for the network: each chunk read from one side is written to the
other ``delay`` seconds later, in order, without holding back the chunks
behind it (a pipe with latency, not a bandwidth limit). The event loop runs
on ``select()``, whose timeout has microsecond resolution (epoll's has a
millisecond one and would turn 0.5 ms into 1 ms or more); the delay actually
added is measured and reported (``stats``) rather than assumed.

Run as its own process (so its event loop does not share the client's GIL)::

    python -m benchmarks.latency_proxy --upstream 127.0.0.1:8443 --delay-ms 2

It prints ``listening on HOST:PORT`` once ready, and on SIGTERM a JSON line
with the number of chunks and the mean and p99 delay it added.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import selectors
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class Stats:
    """Delays actually added, in seconds (those of the first 200,000 chunks)."""

    delays: list[float] = field(default_factory=list)
    chunks: int = 0

    def add(self, delay: float) -> None:
        self.chunks += 1
        if len(self.delays) < 200_000:
            self.delays.append(delay)

    def summary(self) -> dict[str, float | int]:
        d = sorted(self.delays) or [0.0]
        return {
            "chunks": self.chunks,
            "mean_ms": round(statistics.fmean(d) * 1000, 3),
            "p50_ms": round(d[len(d) // 2] * 1000, 3),
            "p99_ms": round(d[int(len(d) * 0.99)] * 1000, 3),
        }


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, stats: Stats
) -> None:
    """Copy one direction: each chunk is written ``delay`` after it was read, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            stats.add(loop.time() - due + delay)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    finally:
        queue.put_nowait((loop.time() + delay, b""))
        with contextlib.suppress(OSError):
            await sender


async def _serve(upstream: tuple[str, int], delay: float, listen: tuple[str, int]) -> None:
    stats = Stats()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                _pump(reader, up_writer, delay, stats), _pump(up_reader, writer, delay, stats)
            )
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            up_writer.close()
            writer.close()

    server = await asyncio.start_server(connection, *listen)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()
    print(json.dumps(stats.summary()), flush=True)


@contextlib.contextmanager
def running(upstream: str, delay_ms: float) -> Iterator[tuple[str, dict[str, float | int]]]:
    """A proxy process to ``upstream``: yields its ``host:port`` and, after the block,
    fills the dict with what it measured."""
    cmd = [sys.executable, "-m", "benchmarks.latency_proxy", "--upstream", upstream,
           "--delay-ms", str(delay_ms)]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    measured: dict[str, float | int] = {}
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the latency proxy did not start: {line!r}")
        yield line.removeprefix("listening on ").strip(), measured
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=30)
        with contextlib.suppress(ValueError):
            measured.update(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="added each way")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: any port)")
    args = parser.parse_args()
    up_host, _, up_port = args.upstream.rpartition(":")
    host, _, port = args.listen.rpartition(":")
    serve = _serve((up_host, int(up_port)), args.delay_ms / 1000, (host, int(port)))
    with asyncio.Runner(loop_factory=_select_loop) as runner:
        runner.run(serve)


def _select_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers wake within microseconds (a handful of sockets only)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


if __name__ == "__main__":
    main()
