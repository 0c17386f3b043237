"""A clock the tests move, and HSM handles on each backend that read time from it
(key rings, key lifetimes and one-time keys: tests/test_rings.py, tests/test_onetime.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

import hsmbridge

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["pkcs11", "nethsm"])
def lifecycle_hsm(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[hsmbridge.HSM]:
    """A fresh handle on each backend's shared HSM, reading time from ``clock``."""
    if request.param == "pkcs11":
        token = request.getfixturevalue("softhsm_token")
        hsm = hsmbridge.open(token.uri, pin=token.pin, clock=clock)
    else:
        from nethsm_fixtures import bridge_of, open_nethsm

        hsm = open_nethsm(bridge_of(request.getfixturevalue("nethsm_hsm")), clock=clock)
    yield hsm
    hsm.close()
