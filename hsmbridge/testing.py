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
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .errors import ConfigurationError
from .pkcs11.module import DEFAULT_MODULE_PATHS

if TYPE_CHECKING:
    from .api import HSM

CONF_TEMPLATE = """\
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


@dataclass
class SoftToken:
    """A SoftHSM2 token made for a test run. The PIN is not in the repr."""

    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    conf: Path
    module: str

    @property
    def uri(self) -> str:
        """A URI without the PIN (pass ``pin=`` or set ``HSMBRIDGE_PIN``)."""
        return f"pkcs11:token={self.label}?module-path={self.module}"

    @property
    def uri_with_pin(self) -> str:
        return f"{self.uri}&pin-value={self.pin}"

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def find_softhsm_module() -> str:
    for path in (os.environ.get("PKCS11_MODULE"), *DEFAULT_MODULE_PATHS):
        if path and os.path.isfile(path):
            return path
    raise ConfigurationError("SoftHSM2 is not installed; apt-get install softhsm2")


def make_tokens(directory: Path, labels: list[str], pin: str = "1234") -> list[SoftToken]:
    """Write softhsm2.conf in ``directory`` and initialise one token per label."""
    if shutil.which("softhsm2-util") is None:
        raise ConfigurationError("softhsm2-util not found; apt-get install softhsm2")
    module = find_softhsm_module()
    tokendir = directory / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(CONF_TEMPLATE.format(tokendir=tokendir))
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    tokens = []
    for label in labels:
        so_pin = os.urandom(8).hex()
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--pin", pin, "--so-pin", so_pin],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        tokens.append(SoftToken(label, pin, so_pin, conf, module))
    return tokens


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
