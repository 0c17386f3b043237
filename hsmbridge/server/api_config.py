"""Configuration endpoints: logging, network, time and the backup passphrase.

Values are validated and stored as the appliance stores them and answered back
the same way. What they change on this host (docs/server.md, "Configuration"):

- logging: ``logLevel`` sets the level of the ``hsmbridge.server`` logger;
  the syslog destination (``ipAddress``/``port``) is stored and reported but
  the server logs where its process logs (stderr), it sends no syslog;
- network: stored and reported only; the host's network is the host's, and
  the server listens where ``--listen`` says;
- time: the appliance's clock is set by storing its offset from the host's
  clock; ``GET /config/time`` answers the host's clock plus that offset. The
  host's clock is not changed (that needs root and belongs to NTP).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import time
from typing import Any

from starlette.responses import JSONResponse, Response

from . import backup
from .auth import check_passphrase_strength
from .bridge import Bridge, Req
from .errors import bad_request

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: the appliance's factory settings
DEFAULT_LOGGING = {"ipAddress": "0.0.0.0", "port": 514, "logLevel": "info"}
DEFAULT_NETWORK = {"ipAddress": "192.168.1.1", "netmask": "255.255.255.0", "gateway": "0.0.0.0"}


def _ipv4(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{what} must be an IPv4 address string such as 192.168.1.1")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise bad_request(f"{what} {value[:50]!r} is not an IPv4 address") from None


def _stored(b: Bridge, name: str, default: dict[str, Any]) -> dict[str, Any]:
    raw = b.store.get_setting(name)
    return dict(default) if raw is None else dict(json.loads(raw))


def apply_log_level(b: Bridge) -> None:
    """Set the server logger's level from the stored logging configuration."""
    level = _stored(b, "logging", DEFAULT_LOGGING)["logLevel"]
    logging.getLogger("hsmbridge.server").setLevel(LOG_LEVELS[level])


def get_logging(b: Bridge, req: Req) -> Response:
    return JSONResponse(_stored(b, "logging", DEFAULT_LOGGING))


def set_logging(b: Bridge, req: Req) -> Response:
    body = req.json_object({"ipAddress", "port", "logLevel"})
    port = body["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise bad_request("port must be an integer from 0 to 65535")
    level = body["logLevel"]
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise bad_request(f"logLevel must be one of {', '.join(LOG_LEVELS)}")
    config = {"ipAddress": _ipv4(body["ipAddress"], "ipAddress"), "port": port, "logLevel": level}
    b.store.set_settings(logging=json.dumps(config))
    apply_log_level(b)
    return Response(status_code=204)


def get_network(b: Bridge, req: Req) -> Response:
    return JSONResponse(_stored(b, "network", DEFAULT_NETWORK))


def set_network(b: Bridge, req: Req) -> Response:
    body = req.json_object({"ipAddress", "netmask", "gateway"})
    config = {name: _ipv4(body[name], name) for name in ("ipAddress", "netmask", "gateway")}
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{config['netmask']}")
    except ValueError:
        raise bad_request(f"netmask {config['netmask']} is not a network mask") from None
    b.store.set_settings(network=json.dumps(config))
    return Response(status_code=204)


def parse_time(value: object, what: str) -> datetime.datetime:
    """An RFC 3339 date-time with a time zone (400 if it is not one)."""
    if not isinstance(value, str):
        raise bad_request(f"{what} must be an RFC 3339 date-time string")
    try:
        parsed = datetime.datetime.fromisoformat(
            value.replace("Z", "+00:00").replace("z", "+00:00")
        )
    except ValueError:
        raise bad_request(f"{what} {value[:40]!r} is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise bad_request(f"{what} needs a time zone (e.g. 'Z' for UTC)")
    return parsed


def now(b: Bridge) -> datetime.datetime:
    """The appliance's clock: the host's plus the offset ``PUT /config/time`` stored."""
    offset = float(b.store.get_setting("time_offset") or 0.0)
    return datetime.datetime.fromtimestamp(time.time() + offset, datetime.UTC)


def set_clock(b: Bridge, when: datetime.datetime, received: float) -> None:
    """Set the appliance's clock to ``when`` as of host time ``received``.

    ``received`` is taken when the request began, before slow work (argon2,
    scrypt), so that work does not set the clock behind.
    """
    b.store.set_settings(time_offset=repr(when.timestamp() - received))


def get_time(b: Bridge, req: Req) -> Response:
    current = now(b).replace(microsecond=0)
    return JSONResponse({"time": current.isoformat().replace("+00:00", "Z")})


def set_time(b: Bridge, req: Req) -> Response:
    received = time.time()
    set_clock(b, parse_time(req.json_object({"time"})["time"], "time"), received)
    return Response(status_code=204)


def set_backup_passphrase(b: Bridge, req: Req) -> Response:
    """Set or change the passphrase backups are encrypted under.

    While none is set, ``currentPassphrase`` must be empty (as the SDK sends it).
    """
    body = req.json_object({"newPassphrase", "currentPassphrase"})
    new = check_passphrase_strength(body["newPassphrase"], "newPassphrase")
    current = body["currentPassphrase"]
    if not isinstance(current, str):
        raise bad_request("currentPassphrase must be a string")
    stored = backup.stored_key(b.store)
    if stored is None and current != "":
        raise bad_request("no backup passphrase is set yet: send currentPassphrase as ''")
    if stored is not None and not b.passphrases.gated(lambda: stored.matches(current)):
        raise bad_request("currentPassphrase is not the current backup passphrase")
    backup.store_key(b.store, b.passphrases.gated(lambda: backup.BackupKey.derive(new)))
    return Response(status_code=204)
