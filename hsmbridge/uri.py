"""Parsing HSM URIs: RFC 7512 ``pkcs11:`` and ``nethsm://``.

The PIN may come from the URI (``pin-value``), a file (``pin-source``), an
environment variable (``pin-env=NAME``, or ``HSMBRIDGE_PIN`` by default) or an
argument to :func:`hsmbridge.open`; it is kept out of every repr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from .errors import ConfigurationError

_PATH_ATTRS = {
    "token",
    "serial",
    "slot-id",
    "manufacturer",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-description",
    "slot-manufacturer",
    "object",
    "id",
    "type",
}
_QUERY_ATTRS = {"module-path", "module-name", "pin-value", "pin-source", "pin-env"}

DEFAULT_PIN_ENV = "HSMBRIDGE_PIN"


@dataclass(frozen=True)
class Secret:
    """A PIN or password that never shows itself in a repr or message."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class Pkcs11URI:
    """The parts of an RFC 7512 URI hsmbridge uses."""

    token: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str | None = None
    pin: Secret | None = None

    def describe(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (("token", self.token), ("serial", self.serial), ("slot-id", self.slot_id))
            if v is not None
        ]
        return "token " + (", ".join(parts) if parts else "(first present)")


def parse_pkcs11_uri(uri: str, *, pin: str | None = None) -> Pkcs11URI:
    """Parse ``pkcs11:token=ci;serial=..?module-path=..&pin-value=..``."""
    if not uri.startswith("pkcs11:"):
        raise ConfigurationError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {_redact(uri)}")
    body = uri[len("pkcs11:") :]
    path, _, query = body.partition("?")
    attrs: dict[str, str] = {}
    raw_id: bytes | None = None
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep or name not in _PATH_ATTRS:
            raise ConfigurationError(
                f"unknown or malformed PKCS#11 URI attribute {name!r}; expected one of "
                + ", ".join(sorted(_PATH_ATTRS))
            )
        if name == "id":
            raw_id = unquote_to_bytes(value)
        attrs[name] = unquote(value)
    for part in filter(None, query.split("&")):
        name, sep, value = part.partition("=")
        if not sep or name not in _QUERY_ATTRS:
            raise ConfigurationError(
                f"unknown or malformed PKCS#11 URI query attribute {name!r}; expected one of "
                + ", ".join(sorted(_QUERY_ATTRS))
            )
        attrs[name] = unquote(value)
    slot_id = None
    if "slot-id" in attrs:
        try:
            slot_id = int(attrs["slot-id"])
        except ValueError:
            raise ConfigurationError(
                f"slot-id must be a decimal number, got {attrs['slot-id']!r}"
            ) from None
    return Pkcs11URI(
        token=attrs.get("token"),
        serial=attrs.get("serial"),
        slot_id=slot_id,
        manufacturer=attrs.get("manufacturer"),
        model=attrs.get("model"),
        object=attrs.get("object"),
        id=raw_id,
        module_path=attrs.get("module-path"),
        pin=_resolve_pin(pin, attrs),
    )


def _resolve_pin(explicit: str | None, attrs: dict[str, str]) -> Secret | None:
    if explicit is not None:
        return Secret(explicit)
    if "pin-value" in attrs:
        return Secret(attrs["pin-value"])
    if "pin-source" in attrs:
        source = attrs["pin-source"]
        source = source[len("file:") :] if source.startswith("file:") else source
        try:
            with open(source, encoding="utf-8") as fh:
                return Secret(fh.read().rstrip("\r\n"))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the PIN from pin-source {source!r}: {exc.strerror}"
            ) from None
    env_name = attrs.get("pin-env", DEFAULT_PIN_ENV)
    value = os.environ.get(env_name)
    if value is None and "pin-env" in attrs:
        raise ConfigurationError(
            f"pin-env={env_name} names an environment variable that is not set; export it"
        )
    return Secret(value) if value is not None else None


@dataclass(frozen=True)
class NetHSMURI:
    """``nethsm://USER@HOST:PORT[,HOST:PORT...][?fingerprint=sha256:HEX&verify=false&ca=F]``."""

    user: str
    hosts: tuple[tuple[str, int], ...]
    params: dict[str, str]


def parse_nethsm_uri(uri: str) -> NetHSMURI:
    if not uri.startswith("nethsm://"):
        raise ConfigurationError(f"not a NetHSM URI (must start with 'nethsm://'): {_redact(uri)}")
    rest = uri[len("nethsm://") :]
    netloc, _, query = rest.partition("?")
    netloc = netloc.rstrip("/")
    user, at, hostlist = netloc.rpartition("@")
    if not at or not user:
        raise ConfigurationError(
            "a NetHSM URI names its user: nethsm://USER@HOST:PORT (the password goes in "
            "password= or NETHSM_PASSWORD, never in the URI)"
        )
    if ":" in user:
        raise ConfigurationError(
            "do not put the password in the NetHSM URI; pass password= or set NETHSM_PASSWORD"
        )
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        parsed = urlsplit("//" + item)
        if not parsed.hostname:
            raise ConfigurationError(f"NetHSM URI has an empty host in {hostlist!r}")
        try:
            port = parsed.port or 443
        except ValueError:
            raise ConfigurationError(f"NetHSM URI has a bad port in {item!r}") from None
        hosts.append((parsed.hostname, port))
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        params[name] = unquote(value)
    return NetHSMURI(user=unquote(user), hosts=tuple(hosts), params=params)


def _redact(uri: str) -> str:
    """The URI with any pin-value (or password) masked, for messages.

    Wherever it stands: a mistyped URI ('PKCS11:...&pin-value=', or the PIN in
    the path) has no query part to strip, yet still carries the PIN.
    """
    return re.sub(r"(?i)([;?&:](?:pin-value|password)=)[^;?&#]*", r"\1***", uri)
