"""Starting ``hsmbridge serve`` as its own process for the server benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import requests


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
