"""A throwaway SoftHSM2 token for tests: yours and hsmbridge's own.

Installed as a pytest plugin, so in a downstream project's tests::

    def test_signing(softhsm_hsm):
        key = softhsm_hsm.generate_key(hsmbridge.RSA(2048), label="t")

SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is initialised, and a
process loads a module once; so one token directory serves a whole pytest
session, and every token it needs is created before the module is loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .softhsm import SoftToken, make_tokens

if TYPE_CHECKING:
    from .api import HSM

__all__ = ["SoftToken", "make_tokens", "softhsm_hsm", "softhsm_token", "softhsm_tokens"]


@pytest.fixture(scope="session")
def softhsm_tokens() -> Iterator[dict[str, SoftToken]]:
    """Two fresh tokens, ``primary`` and ``secondary``, with SOFTHSM2_CONF exported.

    If SOFTHSM2_CONF already names a config whose tokens the process uses,
    it is replaced for the session; the module must not be loaded yet.
    """
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-softhsm-"))
    tokens = make_tokens(directory, ["hsmbridge-test", "hsmbridge-second"])
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(tokens[0].conf)
    try:
        yield {"primary": tokens[0], "secondary": tokens[1]}
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def softhsm_token(softhsm_tokens: dict[str, SoftToken]) -> SoftToken:
    """A fresh SoftHSM2 token for the test session."""
    return softhsm_tokens["primary"]


@pytest.fixture(scope="session")
def softhsm_hsm(softhsm_token: SoftToken) -> Iterator[HSM]:
    """An open :class:`hsmbridge.HSM` on the session's SoftHSM2 token."""
    import hsmbridge

    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    try:
        yield hsm
    finally:
        hsm.close()
