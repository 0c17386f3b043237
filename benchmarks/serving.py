"""Starting ``hsmbridge serve`` as its own process for the server benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (children that exited not included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, cert: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the server answers /health/state over its own certificate (60 s at most)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hsmbridge serve exited: {log.read_text()[-2000:]}")
        if cert.exists():
            try:
                requests.get(f"{url}/health/state", verify=str(cert), timeout=2)
                return
            except requests.RequestException:
                pass
        time.sleep(0.1)
    raise RuntimeError("hsmbridge serve did not start within 60 s")


def run_clients(client: Callable[[int], None], clients: int) -> None:
    """``client(0)`` ... ``client(clients - 1)`` in parallel threads, until all return."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
