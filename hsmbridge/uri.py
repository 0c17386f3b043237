"""Parsing HSM URIs: RFC 7512 ``pkcs11:`` and ``nethsm://``.

The PIN may come from the URI (``pin-value``), a file (``pin-source``), an
environment variable (``pin-env=NAME``, or ``HSMBRIDGE_PIN`` by default) or an
argument to :func:`hsmbridge.open`; it is kept out of every repr.

Nothing derived from a PIN reaches a message, by construction: a URI's text is
never quoted back. Errors name the attribute (from the tables below) or its
position, never the text the user wrote; and a value that holds an unencoded
separator (``;`` ``&`` ``?`` ``=``), which is where a mistyped URI hides a PIN
(``...module-path=/m.so;pin-value=1234``), is refused, so every value that
later appears in a message (a token label, a module path) holds one attribute
and nothing else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from .errors import ConfigurationError

log = logging.getLogger("hsmbridge.uri")

#: RFC 7512 path attributes (section 2.3) and the Pkcs11URI field each fills.
PATH_ATTRIBUTES = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-manufacturer": "slot_manufacturer",
    "slot-description": "slot_description",
    "slot-id": "slot_id",
    "object": "object",
    "id": "id",
    "type": "type",
}
#: RFC 7512 query attributes, hsmbridge's pin-env, and the vendor (x-)
#: attributes hsmbridge acts on; other x- attributes are ignored.
QUERY_ATTRIBUTES = {
    "pin-value": "pin",
    "pin-source": "pin",
    "pin-env": "pin",
    "module-name": "module_name",
    "module-path": "module_path",
    "x-max-sessions": "max_sessions",
    "x-init-reserved": "init_reserved",
}
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
_SEPARATORS = ";&?="

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
    """An RFC 7512 URI: which module, slot, token and object, and how to log in."""

    token: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    manufacturer: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin: Secret | None = None
    #: x-max-sessions: the most sessions hsmbridge opens on the token.
    max_sessions: int | None = None
    #: x-init-reserved: C_Initialize's pReserved string (NSS softokn's configdir).
    init_reserved: str | None = None

    def describe(self) -> str:
        """The token selection, for messages (values hold no separator, see above)."""
        parts = [
            f"{name}={value!r}"
            for name, value in (
                ("token", self.token),
                ("serial", self.serial),
                ("manufacturer", self.manufacturer),
                ("model", self.model),
                ("slot-id", self.slot_id),
                ("slot-description", self.slot_description),
                ("slot-manufacturer", self.slot_manufacturer),
            )
            if value is not None
        ]
        return "token " + (", ".join(parts) if parts else "(first present)")

    @property
    def names_object(self) -> bool:
        """Whether the URI names a key (object, id or type)."""
        return self.object is not None or self.id is not None or self.type is not None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _split(
    text: str, separator: str, known: dict[str, str], other: dict[str, str], where: str
) -> dict[str, str]:
    """``name=value`` pairs; messages name known attributes or positions only."""
    attrs: dict[str, str] = {}
    ignored = 0
    for position, part in enumerate(text.split(separator), 1):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if name in known:
            if not sep:
                raise ConfigurationError(
                    f"the PKCS#11 URI's {name} has no '=value'; write {name}=VALUE"
                )
            if name in attrs:
                raise ConfigurationError(f"the PKCS#11 URI gives {name} twice; keep one")
            if any(c in value for c in _SEPARATORS):
                raise ConfigurationError(
                    f"the PKCS#11 URI's {name} holds an unencoded ';', '&', '?' or '='; "
                    "percent-encode it (%3B %26 %3F %3D), and separate path attributes "
                    "with ';' and query attributes (after '?') with '&'"
                )
            attrs[name] = value
        elif name.startswith("x-") and sep:
            ignored += 1
            log.debug(
                "ignoring the %s %s attribute of a PKCS#11 URI: a vendor (x-) attribute "
                "hsmbridge does not use",
                _ordinal(position),
                where,
            )
        elif name in other:
            raise ConfigurationError(
                f"{name} is a PKCS#11 URI {'query' if where == 'path' else 'path'} attribute "
                f"but stands in the {where}; path attributes come before '?' (separated by "
                "';'), query attributes after it (separated by '&')"
            )
        else:
            raise ConfigurationError(
                f"the {_ordinal(position)} {where} attribute of the PKCS#11 URI is "
                + ("not name=value" if not sep else "not one RFC 7512 defines")
                + f" (a misplaced separator or a typo?); {where} attributes are: "
                + ", ".join(sorted(known))
                + ", or vendor x-NAME"
            )
    return attrs


def _text(attrs: dict[str, str], name: str) -> str | None:
    if name not in attrs:
        return None
    try:
        return unquote(attrs[name], errors="strict")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"the PKCS#11 URI's {name} is not UTF-8 once percent-decoded"
        ) from None


def _number(attrs: dict[str, str], name: str, *, minimum: int) -> int | None:
    text = _text(attrs, name)
    if text is None:
        return None
    if not text.isdigit() or not text.isascii() or int(text) < minimum:
        raise ConfigurationError(f"the PKCS#11 URI's {name} must be a whole number >= {minimum}")
    return int(text)


def _version(attrs: dict[str, str]) -> tuple[int, int] | None:
    text = _text(attrs, "library-version")
    if text is None:
        return None
    major, _, minor = text.partition(".")
    if not (major.isdigit() and major.isascii()) or (
        minor and not (minor.isdigit() and minor.isascii())
    ):
        raise ConfigurationError(
            "the PKCS#11 URI's library-version must be MAJOR or MAJOR.MINOR (e.g. 2.6)"
        )
    return int(major), int(minor or 0)


def parse_pkcs11_uri(uri: str, *, pin: str | None = None) -> Pkcs11URI:
    """Parse ``pkcs11:token=ci;object=k?module-path=..&pin-source=..`` (RFC 7512)."""
    if not isinstance(uri, str) or not uri.startswith("pkcs11:"):
        raise ConfigurationError("not a PKCS#11 URI: it must start with 'pkcs11:' (lower case)")
    body = uri[len("pkcs11:") :]
    path, _, query = body.partition("?")
    path_attrs = _split(path, ";", PATH_ATTRIBUTES, QUERY_ATTRIBUTES, "path")
    query_attrs = _split(query, "&", QUERY_ATTRIBUTES, PATH_ATTRIBUTES, "query")
    object_type = _text(path_attrs, "type")
    if object_type is not None and object_type not in OBJECT_TYPES:
        raise ConfigurationError("the PKCS#11 URI's type must be one of " + ", ".join(OBJECT_TYPES))
    return Pkcs11URI(
        token=_text(path_attrs, "token"),
        serial=_text(path_attrs, "serial"),
        slot_id=_number(path_attrs, "slot-id", minimum=0),
        manufacturer=_text(path_attrs, "manufacturer"),
        model=_text(path_attrs, "model"),
        library_manufacturer=_text(path_attrs, "library-manufacturer"),
        library_description=_text(path_attrs, "library-description"),
        library_version=_version(path_attrs),
        slot_manufacturer=_text(path_attrs, "slot-manufacturer"),
        slot_description=_text(path_attrs, "slot-description"),
        object=_text(path_attrs, "object"),
        id=unquote_to_bytes(path_attrs["id"]) if "id" in path_attrs else None,
        type=object_type,
        module_path=_text(query_attrs, "module-path"),
        module_name=_text(query_attrs, "module-name"),
        pin=_resolve_pin(pin, query_attrs),
        max_sessions=_number(query_attrs, "x-max-sessions", minimum=1),
        init_reserved=_text(query_attrs, "x-init-reserved"),
    )


def _resolve_pin(explicit: str | None, attrs: dict[str, str]) -> Secret | None:
    if explicit is not None:
        return Secret(explicit)
    if "pin-value" in attrs:
        try:
            return Secret(unquote(attrs["pin-value"], errors="strict"))
        except UnicodeDecodeError:
            raise ConfigurationError(
                "the PKCS#11 URI's pin-value is not UTF-8 once percent-decoded"
            ) from None
    if "pin-source" in attrs:
        source = _text(attrs, "pin-source") or ""
        source = source[len("file:") :] if source.startswith("file:") else source
        try:
            with open(source, encoding="utf-8") as fh:
                return Secret(fh.read().rstrip("\r\n"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            # The file name is not repeated: a confused pin-source=PIN would leak.
            raise ConfigurationError(
                f"cannot read the PIN from the file pin-source names: {reason}; give the "
                "path of a file holding the PIN (pin-source=file:/path/to/pin)"
            ) from None
    env_name = _text(attrs, "pin-env") or DEFAULT_PIN_ENV
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
    if not isinstance(uri, str) or not uri.startswith("nethsm://"):
        raise ConfigurationError("not a NetHSM URI: it must start with 'nethsm://'")
    rest = uri[len("nethsm://") :]
    netloc, _, query = rest.partition("?")
    netloc = netloc.rstrip("/")
    user, at, hostlist = netloc.rpartition("@")
    if not at or not user:
        raise ConfigurationError(
            "a NetHSM URI names its user: nethsm://USER@HOST:PORT (the password goes in "
            "password= or NETHSM_PASSWORD, never in the URI)"
        )
    if ":" in user or "@" in user:
        raise ConfigurationError(
            "do not put the password in the NetHSM URI; pass password= or set NETHSM_PASSWORD"
        )
    hosts: list[tuple[str, int]] = []
    for position, item in enumerate(hostlist.split(","), 1):
        parsed = urlsplit("//" + item)
        if not parsed.hostname:
            raise ConfigurationError(f"the {_ordinal(position)} host of the NetHSM URI is empty")
        try:
            port = parsed.port or 443
        except ValueError:
            raise ConfigurationError(
                f"the {_ordinal(position)} host of the NetHSM URI has a bad port"
            ) from None
        hosts.append((parsed.hostname, port))
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        params[name] = unquote(value)
    return NetHSMURI(user=unquote(user), hosts=tuple(hosts), params=params)
