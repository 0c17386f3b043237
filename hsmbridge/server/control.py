"""What request handlers ask of the server process: restart, stop, new TLS identity.

The runner (:mod:`.run`) fills in the hooks; handlers only record what they
want. A reboot or shutdown takes effect after the response is sent: the
runner stops uvicorn gracefully and then starts a new bridge over the same
state directory (reboot, factory reset) or returns (shutdown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REBOOT, SHUTDOWN = "reboot", "shutdown"


def _nothing(action: str) -> None:
    return None


def _no_reload(cert: Path, key: Path) -> None:
    return None


@dataclass
class Control:
    """Hooks into the running server; the defaults do nothing (a bridge without a runner)."""

    #: the TLS key file the server serves with (None: the runner did not say)
    tls_key: Path | None = None
    #: set by a handler: REBOOT or SHUTDOWN once the response is out
    action: str | None = None
    stop: Callable[[str], None] = field(default=_nothing, repr=False)
    reload_tls: Callable[[Path, Path], None] = field(default=_no_reload, repr=False)

    def request(self, action: str) -> None:
        self.action = action
        self.stop(action)
