"""The ``cluster`` of bridge replicas for the suite: real PostgreSQL, three
``hsmbridge serve`` processes over the session's SoftHSM2 token, HAProxy in
front (benchmarks/cluster.py starts and stops each by PID).

``replicas_hsm`` is a NetHSM handle through HAProxy, so the conformance
suite's ``hsm`` fixture runs every test through the load balancer once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nethsm_fixtures import open_nethsm

from benchmarks.cluster import Cluster, Postgres, start_cluster
from hsmbridge.nethsm import NetHSM
from hsmbridge.testing import SoftToken

#: replicas heartbeat every 2 s; a short lease lets the tests see recovery soon
LEASE = "5"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(softhsm_token: SoftToken, postgres: Postgres) -> Iterator[Cluster]:
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-cluster-"))
    running = start_cluster(
        softhsm_token, directory, 3, postgres, env={"HSMBRIDGE_REPLICA_LEASE": LEASE}
    )
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def replicas_hsm(cluster: Cluster) -> Iterator[NetHSM]:
    """A NetHSM handle through HAProxy, as admin carrying the operator credential."""
    hsm = open_nethsm(cluster)  # type: ignore[arg-type]  # a Cluster has a bridge's attributes
    try:
        yield hsm
    finally:
        hsm.close()
