"""HTTP answers and transport failures to hsmbridge's exception tree, in one place.

Every NetHSM error body is ``{"message": ...}``; the mapped error keeps the
HTTP status (``status=``) and the server's message, and says which role or
setting would make the call work. Passwords never reach these messages: only
user names, hosts and key IDs do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import urllib3.exceptions as u3

from ..errors import (
    AuthenticationError,
    ConfigurationError,
    DecryptionFailed,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    MechanismNotSupported,
    PermissionDenied,
    RateLimited,
)

OPERATOR = "Operator"
ADMINISTRATOR = "Administrator"
ANY_USER = "Administrator or Operator"

#: Role -> the open() option that adds a credential of that role to a handle.
_ROLE_OPTION = {OPERATOR: "operator", ADMINISTRATOR: "admin"}

_UNSUPPORTED = re.compile(
    r"not support|unsupported|not implemented|mechanism|invalid (sign |decrypt )?mode",
    re.IGNORECASE,
)
_DECRYPT_FAILED = re.compile(
    r"ciphertext|decryption failed|decrypt failed|failed to decrypt|padding|corrupt",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Call:
    """What a request is for: named in messages, and deciding role and retries."""

    what: str  # e.g. "signing with key 'k1'"
    role: str  # the NetHSM role the endpoint needs
    safe: bool  # may be sent again after a failure (no state changes)
    key_id: str | None = None
    op: str = ""  # "sign", "decrypt", "generate", ... for the 400 mapping
    offers: str = ""  # what to use instead when the mechanism is refused


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, body and the headers hsmbridge reads."""

    status: int
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.data)


def server_message(answer: Answer) -> str:
    """The ``message`` of a NetHSM error body, or a short excerpt of whatever came."""
    try:
        body = answer.json()
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])[:500]
    except ValueError:
        pass
    return answer.data.decode("utf-8", "replace").strip()[:200]


def from_response(answer: Answer, call: Call, *, user: str, where: str) -> HSMError:
    """The hsmbridge error for a NetHSM answer with an error status."""
    status = answer.status
    said = server_message(answer)
    told = f" (NetHSM said: {said})" if said else ""
    if status == 401:
        return AuthenticationError(
            f"{where} refused user {user!r} for {call.what}: wrong user name or password{told}; "
            "check the user in the URI and the password (password= or NETHSM_PASSWORD)",
            status=status,
        )
    if status == 403:
        option = _ROLE_OPTION.get(call.role)
        hint = (
            f"open the HSM as an {call.role.lower()} user, or pass {option}=(user, password)"
            if option
            else "open the HSM as a user with one of these roles"
        )
        return PermissionDenied(
            f"{call.what} needs the {call.role} role and user {user!r} does not have it on "
            f"{where}{told}; {hint}",
            status=status,
        )
    if status == 404:
        if call.key_id is not None:
            return KeyNotFound(
                f"no key with id {call.key_id!r} on {where} ({call.what}){told}; "
                "list the keys with list_keys()",
                status=status,
            )
        return HSMError(f"{where} has no endpoint for {call.what}{told}", status=status)
    if status == 409:
        return KeyExists(
            f"{call.what} failed: the key already exists on {where}{told}; "
            "choose another label or key_id, or delete the old key",
            status=status,
        )
    if status == 412:
        return HSMUnavailable(
            f"{where} is not Operational (locked, unprovisioned or failed) during {call.what}"
            f"{told}; unlock or provision it, or use another instance",
            status=status,
        )
    if status == 429:
        return RateLimited(
            f"{where} rate-limited user {user!r} after a failed login{told}; "
            "wait a second, check the password, then retry",
            status=status,
        )
    if status == 400:
        return _bad_request(call, said, told, where)
    if status == 406 or status == 415:
        return HSMError(f"{where} did not accept the request for {call.what}{told}", status=status)
    if status >= 500:
        return HSMUnavailable(
            f"{where} failed internally during {call.what} (HTTP {status}){told}; "
            "retry later or use another instance",
            status=status,
        )
    return HSMError(f"{call.what} failed on {where}: HTTP {status}{told}", status=status)


def _bad_request(call: Call, said: str, told: str, where: str) -> HSMError:
    if call.op == "decrypt" and _DECRYPT_FAILED.search(said):
        return DecryptionFailed(
            f"{call.what} failed{told}: the ciphertext is corrupt, or was made for another "
            "key or padding",
            status=400,
        )
    if call.op in ("sign", "decrypt") and _UNSUPPORTED.search(said):
        offers = f"; the key offers: {call.offers}" if call.offers else ""
        return MechanismNotSupported(f"{where} cannot do {call.what}{told}{offers}", status=400)
    return InvalidInput(f"{where} refused the input for {call.what}{told}", status=400)


def from_transport(exc: Exception, call: Call, *, where: str) -> HSMError:
    """The hsmbridge error for a request that got no HTTP answer (a urllib3 error)."""
    text = str(exc)
    if tls_refused(exc):
        if "Fingerprints did not match" in text:
            got = re.search(r'got "?([0-9a-fA-F:]+)"?', text)
            actual = f" (its SHA-256 is {got.group(1)})" if got else ""
            return ConfigurationError(
                f"{where} presented a certificate that does not match the pinned fingerprint"
                f"{actual}; nothing was sent. If the appliance's certificate was replaced, "
                "update fingerprint=; otherwise something is intercepting the connection"
            )
        return ConfigurationError(
            f"TLS verification of {where} failed ({_short(text)}); pass ca=/path/to/ca.pem or "
            "fingerprint=sha256:HEX for a self-signed NetHSM certificate"
        )
    if isinstance(exc, u3.TimeoutError) and not isinstance(exc, u3.NewConnectionError):
        return HSMUnavailable(
            f"{where} did not answer {call.what} in time ({_short(text)}); "
            "check the network, or raise timeout="
        )
    unsent = (
        ""
        if call.safe or not_sent(exc)
        else "; the request may have reached the NetHSM: check the result before repeating it"
    )
    return HSMUnavailable(
        f"cannot reach {where} for {call.what} ({_short(text)}){unsent}; "
        "check that the NetHSM is running and reachable"
    )


_CERT_PROBLEM = re.compile(
    r"Fingerprints did not match|certificate verify failed|CERTIFICATE_VERIFY_FAILED|"
    r"doesn't match|not valid for",
    re.IGNORECASE,
)


def tls_refused(exc: Exception) -> bool:
    """Whether the server's certificate was refused (a setting or an attack, never retried)."""
    return isinstance(exc, u3.SSLError) and bool(_CERT_PROBLEM.search(str(exc)))


def not_sent(exc: Exception) -> bool:
    """Whether a failure happened before the request could reach the server.

    Connecting failed or timed out, or the certificate was refused during the
    handshake: nothing of the request was written.
    """
    return isinstance(exc, u3.ConnectTimeoutError) or tls_refused(exc)


def _short(text: str) -> str:
    return re.sub(r"\s+", " ", text)[:200]
