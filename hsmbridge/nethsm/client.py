"""The NetHSM REST transport: pooled keep-alive HTTPS, TLS pinning, retries, failover.

One :class:`Client` talks to one or more NetHSM instances (a cluster's
members, or bridge servers). Each instance keeps up to the configured
concurrency of keep-alive TLS connections (:mod:`hsmbridge.nethsm.wire`), so
batch threads never wait for a socket, and writes and reads HTTP/1.1 itself:
``requests``/urllib3 cost ~0.45 ms of client CPU per request, as much as a
quarter of what the server spends on a signature on a 2-core machine.

Requests that are safe to repeat (sign, decrypt, reads) are retried with
backoff on connection errors, 412, 429 and 5xx, round-robin over the
instances that answer ``/health/ready``; requests that change state
(generate, delete, import) are only sent to another instance when the first
one could not be reached at all, never repeated after sending.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import urllib3.exceptions as u3

from ..errors import ConfigurationError, HSMError, HSMUnavailable
from ..uri import Secret
from .errors import Answer, Call, from_response, from_transport, not_sent, tls_refused
from .wire import Wires, client_context

log = logging.getLogger("hsmbridge.nethsm")

DEFAULT_TIMEOUT = (5.0, 30.0)
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.1
MAX_BACKOFF = 2.0
#: How long an instance that failed is skipped before it is probed again.
COOLDOWN = 2.0
RETRY_STATUSES = frozenset({412, 429, 500, 502, 503, 504})

_FINGERPRINT_RE = re.compile(r"(?:sha-?256:)?([0-9a-fA-F:]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Credential:
    """A NetHSM user and password; the password never shows in a repr."""

    user: str
    password: Secret = field(repr=False)

    def header(self) -> str:
        token = f"{self.user}:{self.password.value}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")


def normalize_fingerprint(text: str) -> str:
    """``sha256:AB:CD..`` / ``abcd..`` to 64 lowercase hex digits."""
    match = _FINGERPRINT_RE.fullmatch(text.strip())
    digits = match.group(1).replace(":", "").lower() if match else ""
    if len(digits) != 64 or not all(c in "0123456789abcdef" for c in digits):
        raise ConfigurationError(
            f"fingerprint must be the certificate's SHA-256 as 64 hex digits, optionally "
            f"'sha256:'-prefixed and colon-separated, got {text!r}; get it with "
            "'openssl x509 -noout -fingerprint -sha256 -in cert.pem'"
        )
    return digits


@dataclass(frozen=True)
class TLSConfig:
    """How the server is authenticated: CA file/system CAs, a pinned fingerprint, or nothing."""

    verify: bool = True
    ca: str | None = None
    fingerprint: str | None = None

    @classmethod
    def from_options(
        cls, verify: Any = None, ca: str | None = None, fingerprint: str | None = None
    ) -> TLSConfig:
        if isinstance(verify, str):
            lowered = verify.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigurationError(f"verify must be true or false, got {verify!r}")
            verify = lowered in ("true", "1", "yes")
        on = True if verify is None else bool(verify)
        if ca is not None and not os.path.isfile(ca):
            raise ConfigurationError(f"ca={ca!r} is not a readable file; give a PEM CA bundle")
        pin = normalize_fingerprint(fingerprint) if fingerprint else None
        if not on and pin is None and ca is None:
            message = (
                "TLS verification of the NetHSM is disabled (verify=false): anyone on the path "
                "can read the password; pin the certificate with fingerprint=sha256:HEX instead"
            )
            warnings.warn(message, stacklevel=4)
            log.warning(message)
        return cls(verify=on, ca=ca, fingerprint=pin)


PREFIX = "/api/v1"
_USER_AGENT = "hsmbridge-nethsm"


class Instance:
    """One NetHSM endpoint with its own keep-alive connections and health state."""

    def __init__(self, host: str, port: int, tls: TLSConfig, maxsize: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        self.base = f"https://{shown}:{port}{PREFIX}"
        self.where = f"NetHSM at {shown}:{port}"
        context = client_context(tls.verify, tls.ca, tls.fingerprint)
        self.wires = Wires(host, port, context, tls.fingerprint, maxsize)
        self.down_until = 0.0
        self.suspect = False
        self.probe_lock = threading.Lock()

    def close(self) -> None:
        self.wires.close()

    def __repr__(self) -> str:
        return f"<Instance {self.base}>"


class Client:
    """Sends NetHSM requests with the retry and failover policy above. Thread-safe."""

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        tls: TLSConfig,
        *,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        if not hosts:
            raise ConfigurationError("a NetHSM URI needs at least one HOST:PORT")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, got {max_connections}")
        if retries < 0:
            raise ConfigurationError(f"retries must be >= 0, got {retries}")
        self.timeout = _timeout(timeout)
        self.max_connections = max_connections
        self.retries = retries
        self.backoff = backoff
        self.tls = tls
        self.instances = [Instance(h, p, tls, max_connections) for h, p in hosts]
        self._rr = itertools.count()
        self.closed = False
        self._stats_lock = threading.Lock()
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failovers": 0, "probes": 0}

    def describe(self) -> str:
        return ", ".join(i.where.removeprefix("NetHSM at ") for i in self.instances)

    def close(self) -> None:
        self.closed = True
        for inst in self.instances:
            inst.close()

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    # -- choosing an instance ------------------------------------------------------

    def _pick(self) -> Instance:
        """Next instance round-robin, skipping ones that failed recently and are not ready."""
        n = len(self.instances)
        start = next(self._rr)
        if n == 1:
            return self.instances[0]
        now = time.monotonic()
        for i in range(n):
            inst = self.instances[(start + i) % n]
            if inst.down_until > now:
                continue
            if not inst.suspect or self._probe(inst):
                return inst
        # Every instance failed recently: send to the one that failed longest ago.
        return min(self.instances, key=lambda x: x.down_until)

    def _probe(self, inst: Instance) -> bool:
        """``GET /health/ready`` on an instance that failed before (one prober at a time)."""
        if not inst.probe_lock.acquire(blocking=False):
            return False
        try:
            self._count("probes")
            timeout = (self.timeout[0], min(self.timeout[1], 5.0))
            headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
            try:  # a public endpoint: no credentials
                answer = inst.wires.request("GET", PREFIX + "/health/ready", headers, None, timeout)
                ready = answer.status == 200
            except (u3.HTTPError, OSError):
                ready = False
            if ready:
                inst.suspect = False
                inst.down_until = 0.0
            else:
                inst.down_until = time.monotonic() + COOLDOWN
            return ready
        finally:
            inst.probe_lock.release()

    def _mark_down(self, inst: Instance) -> None:
        inst.suspect = True
        inst.down_until = time.monotonic() + COOLDOWN

    def _others_up(self, failed: Instance) -> bool:
        now = time.monotonic()
        return any(i is not failed and i.down_until <= now for i in self.instances)

    # -- sending ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        call: Call,
        credential: Credential,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        accept: str = "application/json",
        octets: bytes | None = None,
        content: tuple[str, bytes] | None = None,
    ) -> Answer:
        """Send one request, retrying and failing over per the policy; map errors.

        ``body`` goes as JSON, ``octets`` as ``application/octet-stream``, ``content``
        as a (media type, bytes) pair.
        """
        if self.closed:
            raise HSMUnavailable(
                f"this handle on {self.describe()} was closed; open the HSM again to use it"
            )
        headers = {
            "Authorization": credential.header(),
            "Accept": accept,
            "User-Agent": _USER_AGENT,
        }
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        elif octets is not None:
            data = octets
            headers["Content-Type"] = "application/octet-stream"
        elif content is not None:
            headers["Content-Type"], data = content
        if params:
            path = f"{path}?{urlencode(params)}"
        # Safe calls: retries + 1 attempts. Unsafe: each instance at most once, and
        # only while the request could not be sent.
        attempts = self.retries + 1 if call.safe else len(self.instances)
        error: HSMError | None = None
        for attempt in range(attempts):
            inst = self._pick()
            self._count("requests")
            try:
                answer = inst.wires.request(method, PREFIX + path, headers, data, self.timeout)
            except (u3.HTTPError, OSError) as exc:
                error = from_transport(exc, call, where=inst.where)
                if tls_refused(exc):
                    raise error from None  # a configuration or security problem: never retry
                self._mark_down(inst)
                if not (call.safe or not_sent(exc)):
                    raise error from None
                log.info("%s failed on %s (%s); retrying", call.what, inst.where, exc)
                delay = self._delay(attempt, None)
            else:
                if answer.status < 400:
                    inst.suspect = False
                    return answer
                error = from_response(answer, call, user=credential.user, where=inst.where)
                status = answer.status
                retryable = status in RETRY_STATUSES if call.safe else status == 412
                if not retryable:
                    raise error
                if status == 412 or status >= 500:
                    self._mark_down(inst)
                log.info("%s got HTTP %d from %s; retrying", call.what, status, inst.where)
                delay = self._delay(attempt, answer.headers.get("retry-after"))
            if attempt + 1 < attempts:
                self._count("retries")
                if len(self.instances) > 1 and self._others_up(inst):
                    self._count("failovers")
                elif delay > 0:
                    time.sleep(delay)
        assert error is not None
        raise error

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(MAX_BACKOFF, max(0.0, float(retry_after)))
            except ValueError:
                pass
        base: float = min(MAX_BACKOFF, self.backoff * 2.0**attempt)
        return base * (0.5 + random.random() / 2)

    def get_json(self, path: str, call: Call, credential: Credential, **kw: Any) -> Any:
        return _json(self.request("GET", path, call, credential, **kw), call)

    def post_json(
        self, path: str, call: Call, credential: Credential, body: Mapping[str, Any]
    ) -> Any:
        return _json(self.request("POST", path, call, credential, body=body), call)


def _json(answer: Answer, call: Call) -> Any:
    try:
        return answer.json()
    except ValueError:
        raise HSMError(
            f"the NetHSM answered {call.what} with something that is not JSON",
            status=answer.status,
        ) from None


def _timeout(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p]
        value = tuple(float(p) for p in parts) if len(parts) == 2 else float(value)
    if isinstance(value, (int, float)):
        value = (float(value), float(value))
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and v > 0 for v in value)
    ):
        raise ConfigurationError(
            f"timeout must be seconds (e.g. 10) or a (connect, read) pair, got {value!r}"
        )
    connect, read = value
    return (float(connect), float(read))
