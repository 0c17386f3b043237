"""Fixtures that run the bridge server (``hsmbridge serve``) inside the test process.

Load them as a plugin from a test module (the ``tests`` directory is on
``sys.path`` under pytest's default import mode); the types and helpers live in
:mod:`hsmbridge.server.testing`::

    from hsmbridge.server.testing import TIMEOUT, BridgeServer

    pytest_plugins = ["server_fixtures"]

``bridge_server`` (session scope) -> :class:`BridgeServer`
    One HTTPS server on 127.0.0.1:<free port> over the session's SoftHSM2
    token (the ``pkcs11_hsm`` fixture), already provisioned and Operational,
    with three users:

    - ``admin``    / ``admin.passphrase``    role Administrator
    - ``operator`` / ``operator.passphrase`` role Operator (no tags)
    - ``metrics``  / ``metrics.passphrase``  role Metrics

    Use ``.url`` (``https://127.0.0.1:PORT/api/v1``), ``.hostport`` (the
    ``nethsm`` SDK's ``host``), ``.ca_file`` (the self-signed certificate,
    valid as a CA bundle for ``requests``/``verify=``), ``.fingerprint``
    (``sha256:AA:BB:..``), ``.unlock_passphrase``, and ``.sdk(role)`` for an
    official ``nethsm.NetHSM`` client. Keys are shared by every test of the
    session: give them unique ids (the ``unique_label`` fixture). Do not lock
    it or change the users' passphrases; use ``bridge_factory`` for that.

``bridge_factory`` (function scope) -> ``make(provision=True, limits=DEFAULT, threads=64)``
    Starts extra servers on fresh state directories over the same token (so
    state-machine tests can provision, lock and restart); all are stopped at
    teardown. ``make(provision=False)`` leaves the server Unprovisioned.
    ``BridgeServer.restart()`` stops a server and starts a new one on the same
    state directory (restarts come up Locked, as the appliance does).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hsmbridge import HSM
from hsmbridge.server.limits import DEFAULT, Limits
from hsmbridge.server.testing import TIMEOUT, BridgeServer, Credentials, start_bridge

__all__ = ["TIMEOUT", "BridgeServer", "Credentials", "bridge_factory", "bridge_server"]


@pytest.fixture(scope="session")
def bridge_server(pkcs11_hsm: HSM) -> Iterator[BridgeServer]:
    """A provisioned bridge server over the session's SoftHSM2 token (see module doc)."""
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-serve-"))
    try:
        bridge = start_bridge(pkcs11_hsm, directory, True)
        try:
            yield bridge
        finally:
            bridge.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def bridge_factory(pkcs11_hsm: HSM, tmp_path: Path) -> Iterator[Callable[..., BridgeServer]]:
    """``make(provision=True)``: extra servers on fresh state dirs, stopped at teardown."""
    started: list[BridgeServer] = []

    def make(provision: bool = True, limits: Limits = DEFAULT, threads: int = 64) -> BridgeServer:
        directory = tmp_path / f"state-{len(started)}"
        bridge = start_bridge(pkcs11_hsm, directory, provision, limits, threads)
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.stop()
