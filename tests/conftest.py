"""Shared fixtures: a SoftHSM2 token per session (from hsmbridge.testing) and
the backend-parametrized ``hsm`` fixture the conformance suite runs on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from token_gaps import TOKEN

import hsmbridge
from hsmbridge.testing import SoftToken

BACKENDS = [f"pkcs11-{TOKEN}", "nethsm", "replicas"]


@pytest.fixture
def unique_label() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pkcs11_hsm(request: pytest.FixtureRequest) -> Iterator[hsmbridge.HSM]:
    if TOKEN == "softhsm2":
        token: SoftToken = request.getfixturevalue("softhsm_token")
        hsm = hsmbridge.open(token.uri, pin=token.pin)
    else:
        hsm = hsmbridge.open()  # HSMBRIDGE_HSM and HSMBRIDGE_PIN, from the runner
    yield hsm
    hsm.close()


@pytest.fixture(scope="session", params=BACKENDS)
def hsm(request: pytest.FixtureRequest) -> hsmbridge.HSM:
    """Every backend behind the one key API: the conformance suite's subject."""
    if request.param.startswith("pkcs11"):
        return request.getfixturevalue("pkcs11_hsm")  # type: ignore[no-any-return]
    if request.param == "replicas":  # three bridge replicas on PostgreSQL behind HAProxy
        return request.getfixturevalue("replicas_hsm")  # type: ignore[no-any-return]
    try:
        return request.getfixturevalue("nethsm_hsm")  # type: ignore[no-any-return]
    except pytest.FixtureLookupError:
        pytest.skip("the NetHSM backend fixture (nethsm_hsm) is not available")


from clock_fixtures import clock, lifecycle_hsm  # noqa: E402, F401
from nethsm_fixtures import nethsm_hsm  # noqa: E402, F401
from replica_fixtures import cluster, postgres, replicas_hsm  # noqa: E402, F401
