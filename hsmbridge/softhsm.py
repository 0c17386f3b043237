"""Throwaway SoftHSM2 tokens: for tests, CI and the embedded demo.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is initialised, so every token
a process needs is created before hsmbridge loads the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError
from .pkcs11.module import DEFAULT_MODULE_PATHS

DEMO_DIR_ENV = "HSMBRIDGE_DEMO_DIR"
DEMO_LABEL = "hsmbridge-demo"
DEMO_PIN = "1234"

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


def _token_exists(conf: Path, label: str) -> bool:
    result = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
    )
    return any(
        line.split(":", 1)[1].strip() == label
        for line in result.stdout.splitlines()
        if line.strip().startswith("Label:")
    )


def embedded_demo_token() -> SoftToken:
    """The demo's own token (made once, then reused), exported via SOFTHSM2_CONF.

    Lives in ``$HSMBRIDGE_DEMO_DIR`` or ``~/.cache/hsmbridge/demo``. The demo PIN
    is public: this token is for demonstrations, never for real keys.
    """
    directory = Path(os.environ.get(DEMO_DIR_ENV) or Path.home() / ".cache" / "hsmbridge" / "demo")
    conf = directory / "softhsm2.conf"
    if conf.exists() and _token_exists(conf, DEMO_LABEL):
        token = SoftToken(DEMO_LABEL, DEMO_PIN, "", conf, find_softhsm_module())
    else:
        token = make_tokens(directory, [DEMO_LABEL], pin=DEMO_PIN)[0]
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return token
