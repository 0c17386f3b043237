"""System endpoints: info, health, provision, lock/unlock, random, metrics, config."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from starlette.responses import JSONResponse, Response

from .. import __version__
from . import api_config
from . import metrics as metrics_names
from .auth import check_passphrase_strength
from .bridge import LOCKED, OPERATIONAL, UNPROVISIONED, Bridge, Req
from .errors import ApiError, bad_request
from .keys import b64
from .tls import public_key_pem

#: the throttling subject of unlock passphrase checks (not a valid user ID)
UNLOCK = "<unlock>"


def info(b: Bridge, req: Req) -> Response:
    return JSONResponse({"vendor": "hsmbridge", "product": "NetHSM"})


def health_alive(b: Bridge, req: Req) -> Response:
    b.require_state(LOCKED, UNPROVISIONED)
    return Response(status_code=200)


def health_ready(b: Bridge, req: Req) -> Response:
    b.require_state(OPERATIONAL)
    return Response(status_code=200)


def health_state(b: Bridge, req: Req) -> Response:
    return JSONResponse({"state": b.state})


def provision(b: Bridge, req: Req) -> Response:
    received = time.time()
    body = req.json_object({"unlockPassphrase", "adminPassphrase", "systemTime"})
    unlock = check_passphrase_strength(body["unlockPassphrase"], "unlockPassphrase")
    admin = check_passphrase_strength(body["adminPassphrase"], "adminPassphrase")
    when = api_config.parse_time(body["systemTime"], "systemTime")
    admin_user = b.new_user("admin", "admin", "Administrator", admin)
    unlock_hash = b.passphrases.hash(unlock)
    b.provision(admin_user, unlock_hash)
    api_config.set_clock(b, when, received)
    return Response(status_code=204)


def unlock(b: Bridge, req: Req) -> Response:
    body = req.json_object({"passphrase"})
    passphrase = body["passphrase"]
    if not isinstance(passphrase, str):
        raise bad_request("passphrase must be a string")
    stored = b.store.get_setting("unlock_hash")
    if not b.passphrases.check(
        req.client,
        UNLOCK,
        passphrase,
        stored,
        remember=False,
        upgrade=lambda new: stored is not None and b.store.replace_hash(None, stored, new),
    ):
        b.store.share_failed_login(req.client, UNLOCK)  # the other replicas throttle too
        raise ApiError(403, "unlock failed: wrong unlock passphrase")
    b.set_state(LOCKED, OPERATIONAL)
    return Response(status_code=204)


def lock(b: Bridge, req: Req) -> Response:
    b.set_state(OPERATIONAL, LOCKED)
    return Response(status_code=204)


def random(b: Bridge, req: Req) -> Response:
    body = req.json_object({"length"})
    length = body["length"]
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 1024:
        raise bad_request("length must be an integer between 1 and 1024")
    return JSONResponse({"random": b64(os.urandom(length))})


def metrics(b: Bridge, req: Req) -> Response:
    uptime = int(time.time() - b.started)
    return JSONResponse(
        {
            **metrics_names.runtime(),
            **b.http_metrics.snapshot(),
            "kv write": b.store.writes,
            "uptime": uptime,
            "keyOperations": b.store.total_operations(),
            "keys": len(b.store.list_keys()),
            "users": len(b.store.list_users()),
            "uptimeSeconds": uptime,
        }
    )


def system_info(b: Bridge, req: Req) -> Response:
    return JSONResponse(
        {
            "softwareVersion": __version__,
            "softwareBuild": "hsmbridge",
            "firmwareVersion": platform.python_version(),
            "hardwareVersion": b.hsm.description,
            "deviceId": "hsmbridge",
            "akPub": {},
            "pcr": {},
        }
    )


def set_unlock_passphrase(b: Bridge, req: Req) -> Response:
    body = req.json_object({"newPassphrase", "currentPassphrase"})
    new = check_passphrase_strength(body["newPassphrase"], "newPassphrase")
    current = body["currentPassphrase"]
    stored = b.store.get_setting("unlock_hash")
    if not isinstance(current, str) or not b.passphrases.check(
        req.client, UNLOCK, current, stored, remember=False
    ):
        raise bad_request("currentPassphrase is not the current unlock passphrase")
    new_hash = b.passphrases.hash(new)
    b.store.set_settings(unlock_hash=new_hash)
    return Response(status_code=204)


def get_unattended_boot(b: Bridge, req: Req) -> Response:
    return JSONResponse({"status": b.store.get_setting("unattended_boot") or "off"})


def set_unattended_boot(b: Bridge, req: Req) -> Response:
    status = req.json_object({"status"})["status"]
    if status not in ("on", "off"):
        raise bad_request("status must be 'on' or 'off'")
    b.store.set_settings(unattended_boot=status)
    return Response(status_code=204)


def _tls_cert(b: Bridge) -> Any:
    if b.tls_cert is None:
        raise ApiError(404, "this server was started without TLS")
    return b.tls_cert


def tls_public_pem(b: Bridge, req: Req) -> Response:
    return Response(public_key_pem(_tls_cert(b)), media_type="application/x-pem-file")


def tls_cert_pem(b: Bridge, req: Req) -> Response:
    return Response(_tls_cert(b).read_bytes(), media_type="application/x-pem-file")
