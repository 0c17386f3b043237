"""Two ways to measure how late an asyncio event loop serves what became ready.

- :class:`TimerProbe`: a task sleeps 1 ms in a loop and records how much later
  than asked it wakes. Its floor is the selector's: epoll takes its timeout in
  whole milliseconds and asyncio rounds it up, so once anything else wakes the
  loop, the probe's timer is often waited for with a timeout rounded up to the
  next millisecond (docs/design.md, fact 22).
- :class:`SocketProbe`: a thread sends one byte over a socket pair every ~1 ms
  and a task awaiting ``loop.sock_recv`` records how long after the send it
  resumed: what a request arriving on a server's socket waits for the loop,
  with no timer in the path.

Both record, per sample, the lateness in seconds; :func:`summary` gives the
percentiles in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from typing import Any

PERIOD = 0.001


class TimerProbe:
    """Sleeps PERIOD in a loop; records how much later than asked it woke and how much
    CPU the loop thread used meanwhile (seconds): a late wake with the loop busy is the
    loop's own work, one with the loop idle is a wait for the GIL or a core."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (overshoot, loop-thread CPU)
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            start, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(PERIOD)
            overshoot = loop.time() - start - PERIOD
            self.samples.append((overshoot, time.thread_time() - cpu))

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task


class SocketProbe:
    """A thread sends a byte every ~PERIOD (the next only after the last was read); a
    task awaiting it on the loop records the delay from send to resumption."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._read = threading.Event()
        self._sent_at = 0.0
        self._pair = socket.socketpair()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._send, name="socket-probe", daemon=True)

    def start(self) -> None:
        self._pair[1].setblocking(False)
        self._read.set()
        self._task = asyncio.ensure_future(self._receive())
        self._thread.start()

    def _send(self) -> None:
        while not self._stop.is_set():
            time.sleep(PERIOD)
            if self._read.wait(0.5):
                self._read.clear()
                self._sent_at = time.perf_counter()
                self._pair[0].send(b"x")

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.sock_recv(self._pair[1], 16)
            self.samples.append(time.perf_counter() - self._sent_at)
            self._read.set()

    async def stop(self) -> None:
        self._stop.set()
        self._read.set()
        await asyncio.to_thread(self._thread.join)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for end in self._pair:
            end.close()


class Probes:
    """Both probes on the running loop: ``async with Probes() as probes: ...``."""

    def __init__(self) -> None:
        self.timer = TimerProbe()
        self.socket = SocketProbe()

    async def __aenter__(self) -> Probes:
        self.timer.start()
        self.socket.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.timer.stop()
        await self.socket.stop()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(seconds: list[float]) -> dict[str, Any]:
    """p50/p99/max in ms and the share of samples over 1 ms late."""
    ms = [v * 1000 for v in seconds]
    if not ms:
        return {"samples": 0}
    return {
        "samples": len(ms),
        "p50": round(_pct(ms, 0.50), 3),
        "p99": round(_pct(ms, 0.99), 3),
        "max": round(max(ms), 3),
        "over_1ms_pct": round(100 * sum(v > 1 for v in ms) / len(ms), 2),
    }


def timer_summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """:func:`summary` of a TimerProbe, with what the loop did in the late wakes."""
    out = summary([v for v, _ in samples])
    late = [(v * 1000, busy * 1000) for v, busy in samples if v > 0.001]
    # wakes over 1 ms late: how late on average, and how much of the interval
    # (PERIOD + lag) the loop thread spent on the CPU
    out["late_mean"] = round(statistics.mean(v for v, _ in late), 3) if late else None
    out["late_loop_cpu_mean"] = round(statistics.mean(b for _, b in late), 3) if late else None
    return out
