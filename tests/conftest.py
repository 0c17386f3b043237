"""Shared fixtures: a SoftHSM2 token per session (from hsmbridge.testing) and
the backend-parametrized ``hsm`` fixture the conformance suite runs on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import hsmbridge
from hsmbridge.testing import SoftToken

BACKENDS = ["pkcs11", "nethsm", "replicas"]


@pytest.fixture
def unique_label() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pkcs11_hsm(softhsm_token: SoftToken) -> Iterator[hsmbridge.HSM]:
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    yield hsm
    hsm.close()


@pytest.fixture(scope="session", params=BACKENDS)
def hsm(request: pytest.FixtureRequest) -> hsmbridge.HSM:
    """Every backend behind the one key API: the conformance suite's subject."""
    if request.param == "pkcs11":
        return request.getfixturevalue("pkcs11_hsm")  # type: ignore[no-any-return]
    if request.param == "replicas":  # three bridge replicas on PostgreSQL behind HAProxy
        return request.getfixturevalue("replicas_hsm")  # type: ignore[no-any-return]
    try:
        return request.getfixturevalue("nethsm_hsm")  # type: ignore[no-any-return]
    except pytest.FixtureLookupError:
        pytest.skip("the NetHSM backend fixture (nethsm_hsm) is not available")


from nethsm_fixtures import nethsm_hsm  # noqa: E402, F401
from replica_fixtures import cluster, postgres, replicas_hsm  # noqa: E402, F401
