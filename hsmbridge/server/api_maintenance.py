"""System maintenance endpoints: backup, restore, reboot, shutdown, factory reset.

What a backup holds is in :mod:`.backup`. A factory reset destroys exactly
the keys this server made or imported (every key its database knows, in any
state) and nothing else in the token, then forgets its state and restarts
Unprovisioned. Reboot and shutdown restart or stop the server process after
the response is sent (:mod:`.control`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from starlette.responses import Response

from ..errors import HSMError, KeyNotFound
from ..nethsm import vocabulary
from . import api_config, backup
from .bridge import LOCKED, OPERATIONAL, UNPROVISIONED, Bridge, Req
from .control import REBOOT, SHUTDOWN
from .errors import ApiError, bad_request
from .state import KeyRecord

log = logging.getLogger("hsmbridge.server")


def _require_admin(b: Bridge, req: Req) -> None:
    """For endpoints public in some states: the app authenticated the caller unless the
    state was public then; if the state changed since, refuse (the client retries)."""
    if req.user is None and b.state == OPERATIONAL:
        raise ApiError(
            401, "the bridge became Operational: authenticate as an Administrator and retry"
        )


def make_backup(b: Bridge, req: Req) -> Response:
    key = backup.stored_key(b.store)
    if key is None:
        raise bad_request("no backup passphrase is set: an Administrator sets one first")
    data = backup.encrypt(backup.entries_of(b.store), key)
    return Response(data, media_type="application/octet-stream")


def _in_token(b: Bridge, rec: KeyRecord) -> bool:
    try:
        if rec.type == vocabulary.GENERIC:
            b.hsm.get_secret_key(key_id=rec.backend_id)
        else:
            b.hsm.get_key(key_id=rec.backend_id)
    except KeyNotFound:
        log.warning(
            "restore: key %s is not in %s any more (keys stay in the token); skipped",
            rec.id,
            b.hsm.description,
        )
        return False
    return True


def restore(b: Bridge, req: Req) -> Response:
    """Unprovisioned: restore everything. Operational: add users, namespaces and keys.

    Either way the bridge is Locked afterwards, as the appliance is.
    """
    received = time.time()
    _require_admin(b, req)
    form = req.form
    if form is None or not isinstance(form.get("backup_file"), bytes | str):
        raise bad_request("send multipart/form-data with 'arguments' and a 'backup_file' part")
    raw_args = form.get("arguments", "{}")
    try:
        args = json.loads(raw_args)
    except ValueError:
        raise bad_request("the 'arguments' part is not valid JSON") from None
    if not isinstance(args, dict) or set(args) - {"backupPassphrase", "systemTime"}:
        raise bad_request("'arguments' holds backupPassphrase and, optionally, systemTime")
    passphrase = args.get("backupPassphrase")
    if not isinstance(passphrase, str):
        raise bad_request("arguments.backupPassphrase must be a string")
    when = api_config.parse_time(args["systemTime"], "systemTime") if "systemTime" in args else None
    data = form["backup_file"]

    def key_for(salt: bytes) -> backup.BackupKey:
        return b.passphrases.gated(lambda: backup.BackupKey.derive(passphrase, salt))

    contents = backup.contents_of(
        backup.decrypt(data if isinstance(data, bytes) else data.encode(), key_for)
    )
    keys = [rec for rec in contents.keys if _in_token(b, rec)]
    if b.state == UNPROVISIONED:
        if "unlock_hash" not in contents.settings:
            raise bad_request("the backup has no unlock passphrase, so it cannot provision")
        settings, expected = contents.settings, None
    else:  # a partial restore: configuration stays
        settings, expected = {}, OPERATIONAL
    # Locked afterwards either way, as the appliance is
    if not b.store.restore(
        settings, contents.users, keys, contents.namespaces, expected=expected, state=LOCKED
    ):
        raise ApiError(412, "precondition failed: the bridge changed state during the restore")
    if when is not None:
        api_config.set_clock(b, when, received)
    api_config.apply_log_level(b)  # a full restore brings the logging configuration back
    return Response(status_code=204)


def reboot(b: Bridge, req: Req) -> Response:
    b.control.request(REBOOT)
    return Response(status_code=204)


def shutdown(b: Bridge, req: Req) -> Response:
    """Stop the server; Operational needs an Administrator, other states anyone (spec)."""
    _require_admin(b, req)
    b.control.request(SHUTDOWN)
    return Response(status_code=204)


def factory_reset(b: Bridge, req: Req) -> Response:
    """Destroy this server's keys in the token, forget its state, restart Unprovisioned."""
    b.set_state(OPERATIONAL, UNPROVISIONED)  # nothing else runs while the keys go
    failed = []
    for rec in b.store.all_keys():
        try:
            b.destroy_backend_key(rec)
        except HSMError as exc:
            failed.append(f"{rec.id} ({exc.message})")
    if failed:
        b.set_state(UNPROVISIONED, OPERATIONAL)
        raise ApiError(
            503, f"factory reset stopped: could not destroy keys {', '.join(failed)}; retry"
        )
    b.store.wipe()
    cert, key = b.tls_cert, b.control.tls_key
    if cert is not None and key is not None and cert.parent == b.state_dir:
        for path in (cert, key):  # the next start makes a new identity
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    b.control.request(REBOOT)
    return Response(status_code=204)
