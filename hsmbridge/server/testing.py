"""Running a provisioned bridge server for tests (used by tests/server_fixtures.py).

:func:`start_bridge` serves an HSM from a thread of the calling process and,
optionally, provisions it with fixed test credentials: an ``admin``
(Administrator), an ``operator`` (Operator) and a ``metrics`` (Metrics) user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ..api import HSM
from .limits import DEFAULT, Limits
from .run import RunningServer, start_in_thread

TIMEOUT = 30  # seconds, every request


@dataclass
class Credentials:
    user: str
    passphrase: str = field(repr=False)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.passphrase)


@dataclass
class BridgeServer:
    """A running bridge plus the credentials it was provisioned with."""

    server: RunningServer
    hsm: HSM
    state_dir: Path
    admin: Credentials
    operator: Credentials
    metrics: Credentials
    unlock_passphrase: str = field(repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def hostport(self) -> str:
        return self.server.hostport

    @property
    def ca_file(self) -> str:
        return str(self.server.cert)

    @property
    def fingerprint(self) -> str:
        return self.server.fingerprint

    def session(self, who: Credentials | None = None) -> requests.Session:
        """A ``requests`` session trusting the server's certificate, logged in as ``who``."""
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override ``verify`` otherwise
        s.verify = self.ca_file
        if who is not None:
            s.auth = who.auth
        return s

    def sdk(self, role: str = "operator") -> Any:
        """An official ``nethsm.NetHSM`` client logged in as admin, operator or metrics."""
        import nethsm

        who: Credentials = getattr(self, role)
        return nethsm.NetHSM(
            self.hostport,
            nethsm.Authentication(who.user, who.passphrase),
            verify_tls=True,
            ca_certs=self.ca_file,
        )

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """Stop and start again on the same state directory (comes up Locked)."""
        limits = self.server.bridge.limits
        self.server.stop()
        self.server = start_in_thread(self.hsm, self.state_dir, limits=limits)


ADMIN_PASSPHRASE = "admin-passphrase-0"
UNLOCK_PASSPHRASE = "unlock-passphrase-0"


def provision(bridge: BridgeServer) -> None:
    """Provision the server and add the operator and metrics users."""
    with bridge.session() as s:
        r = s.post(
            f"{bridge.url}/provision",
            json={
                "unlockPassphrase": bridge.unlock_passphrase,
                "adminPassphrase": bridge.admin.passphrase,
                "systemTime": "2026-01-01T00:00:00Z",
            },
            timeout=TIMEOUT,
        )
        r.raise_for_status()
        s.auth = bridge.admin.auth
        for who, role in ((bridge.operator, "Operator"), (bridge.metrics, "Metrics")):
            r = s.put(
                f"{bridge.url}/users/{who.user}",
                json={"realName": who.user, "role": role, "passphrase": who.passphrase},
                timeout=TIMEOUT,
            )
            r.raise_for_status()


def start_bridge(
    hsm: HSM, directory: Path, do_provision: bool, limits: Limits = DEFAULT, threads: int = 64
) -> BridgeServer:
    server = start_in_thread(hsm, directory, limits=limits, threads=threads)
    bridge = BridgeServer(
        server=server,
        hsm=hsm,
        state_dir=directory,
        admin=Credentials("admin", ADMIN_PASSPHRASE),
        operator=Credentials("operator", "operator-passphrase-0"),
        metrics=Credentials("metrics", "metrics-passphrase-0"),
        unlock_passphrase=UNLOCK_PASSPHRASE,
    )
    if do_provision:
        try:
            provision(bridge)
        except BaseException:
            server.stop()
            raise
    return bridge
