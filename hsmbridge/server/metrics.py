"""``GET /metrics``: the appliance's metric names, where this server has an equivalent.

The appliance (a MirageOS unikernel) reports its OCaml runtime, HTTP and
key-value store counters under names such as ``http response 200`` and ``kv
write``. The same names here mean:

- ``http response <status>``, ``http response total``: responses sent by this
  server process since it started, by status and in all;
- ``http response time``: their mean time from request to response, in
  milliseconds (from the request's arrival at the app to its answer);
- ``kv write``: committed write transactions of the state database;
- ``log errors``, ``log warnings``: records the ``hsmbridge`` loggers wrote at
  those levels;
- ``gc minor collections``, ``gc major collections``: CPython's collections of
  its young generations and of its oldest one; ``gc compactions`` is 0 (the
  CPython collector never compacts); ``gc major bytes`` is the process's
  resident memory (CPython has no major heap to measure);
- ``uptime``: seconds since this server (re)started.

Plus hsmbridge's own: ``keyOperations``, ``keys``, ``users``, ``uptimeSeconds``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import Counter
from typing import Any


class _LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[int] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[logging.ERROR if record.levelno >= logging.ERROR else logging.WARNING] += 1


_log_counter = _LogCounter()
logging.getLogger("hsmbridge").addHandler(_log_counter)


class HttpMetrics:
    """Responses by status and their total time; only the event-loop thread records."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.seconds = 0.0
        self._lock = threading.Lock()

    def record(self, status: int, seconds: float) -> None:
        with self._lock:
            self.statuses[status] += 1
            self.seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            total = sum(self.statuses.values())
            out: dict[str, Any] = {f"http response {s}": n for s, n in self.statuses.items()}
            out["http response total"] = total
            out["http response time"] = round(1000 * self.seconds / total, 3) if total else 0
        for status in (200, 201, 204):
            out.setdefault(f"http response {status}", 0)
        return out


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def runtime() -> dict[str, Any]:
    """The runtime and log metrics under the appliance's names."""
    stats = gc.get_stats()
    return {
        "gc compactions": 0,
        "gc major bytes": _resident_bytes(),
        "gc major collections": stats[-1]["collections"],
        "gc minor collections": sum(s["collections"] for s in stats[:-1]),
        "log errors": _log_counter.counts[logging.ERROR],
        "log warnings": _log_counter.counts[logging.WARNING],
    }
