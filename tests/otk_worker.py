"""Processes that use one-time keys, for tests/test_onetime_processes.py (started with
multiprocessing's spawn method: a fresh interpreter, the PIN or password passed through its pipe,
never argv). Each writes one JSON object per line to ``out`` with a single
``os.write`` on an O_APPEND descriptor, so a SIGKILL never leaves half a line."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import hsmbridge
from hsmbridge import RSA, jose

#: one-time keys in these tests: RSA-1024 keeps generation quick; OAEP-SHA1 (SoftHSM2)
SPEC = RSA(1024)
ALG = "RSA-OAEP"


def _say(out: str, **fields: Any) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def _open(uri: str, options: dict[str, Any]) -> hsmbridge.HSM:
    """``options``: ``pin`` (PKCS#11) or ``password``, ``operator``, ``fingerprint`` (NetHSM)."""
    for attempt in range(3):  # SoftHSM2 may fail C_GetTokenInfo while others write the token
        try:
            return hsmbridge.open(uri, **options)
        except hsmbridge.HSMError:
            if attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def issue(uri: str, options: dict[str, Any], name: str, count: int, start: float, out: str) -> None:
    """Issue ``count`` keys from a warm pool, starting at ``start`` (time.time())."""
    hsm = _open(uri, options)
    otk = hsm.one_time_keys(SPEC, pool=count, alg=ALG, name=name)
    otk.fill()
    while time.time() < start:
        time.sleep(0.001)
    for _ in range(count):
        k = otk.issue()
        _say(out, issued=k.kid, jwk=k.jwk)
    otk.close()
    hsm.close()


def issue_loop(uri: str, options: dict[str, Any], name: str, out: str) -> None:
    """Issue keys until killed, reporting each once issue() returned it."""
    hsm = _open(uri, options)
    otk = hsm.one_time_keys(SPEC, pool=2, alg=ALG, name=name, refill_threads=2)
    _say(out, ready=True)
    while True:
        k = otk.issue()
        _say(out, issued=k.kid, jwk=k.jwk)


def decrypt(
    uri: str, options: dict[str, Any], name: str, tokens: list[str], start: float, out: str
) -> None:
    """Decrypt every token, starting at ``start``; report each outcome."""
    hsm = _open(uri, options)
    otk = hsm.one_time_keys(SPEC, pool=1, alg=ALG, name=name)
    otk.close()  # decrypting needs no pool
    _say(out, ready=True)
    while time.time() < start:
        time.sleep(0.001)
    for token in tokens:
        kid = jose.jwe_header(token)["kid"]
        _say(out, claiming=kid)
        try:
            plaintext = otk.decrypt_jwe(token)
        except hsmbridge.HSMError as exc:
            _say(out, kid=kid, error=type(exc).__name__, message=str(exc))
        else:
            _say(out, kid=kid, plaintext=plaintext.decode())
    hsm.close()
