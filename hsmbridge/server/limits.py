"""Every resource limit of ``hsmbridge serve``, in one table (see docs/server.md).

Each bound answers one way to exhaust the server without credentials (or with
few): connections that never finish a handshake or a request, idle keep-alive
connections, headers and bodies of any size, password hashing as a CPU and
memory amplifier, and numbers in imported keys whose arithmetic never ends.
A server takes one :class:`Limits` (the defaults below unless a caller passes
its own, as tests do to make a limit reachable quickly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    """The server's resource limits; every field is documented in docs/server.md."""

    # -- connections (hsmbridge/server/connections.py) ------------------------------
    #: seconds from TCP accept to the end of the first request's headers (TLS
    #: handshake included), and from a request's first byte to the end of its headers
    header_timeout: float = 5.0
    #: seconds an idle keep-alive connection stays open between requests
    keep_alive_timeout: float = 15.0
    #: open connections (handshaking, busy or idle) per client address (IPv6: per /64)
    connections_per_client: int = 64
    #: open connections in total; at the cap the longest-idle keep-alive one is closed.
    #: Each TLS connection holds ~300 KiB (asyncio's 256 KiB read buffer, OpenSSL)
    max_connections: int = 1024
    #: bytes of request line plus headers
    max_header_bytes: int = 16 * 1024
    #: header lines per request
    max_headers: int = 64

    # -- requests (hsmbridge/server/app.py) ------------------------------------------
    #: requests being handled at once (idle connections do not count); beyond: 503
    max_requests: int = 256
    #: bytes of a request body, every content type alike (multipart included)
    max_body: int = 2 * 1024 * 1024
    #: bytes of a body on the unauthenticated routes (/provision, /unlock)
    max_public_body: int = 64 * 1024
    #: bytes of a backup upload (/system/restore; public only while Unprovisioned)
    max_backup_body: int = 2 * 1024 * 1024
    #: seconds from the end of a request's headers to the end of its body
    body_timeout: float = 30.0
    #: seconds a connection answered before its body was read lingers, so the client
    #: can read the answer, before the rest of the body is cut off unread
    unread_body_linger: float = 1.0
    #: parts of a multipart form (PEM key import: ``arguments`` and ``key_file``)
    max_form_parts: int = 8
    #: nesting depth of a JSON body (the API needs 3)
    max_json_depth: int = 32

    # -- passphrases (hsmbridge/server/auth.py) --------------------------------------
    #: argon2id verifications or hashes running at once; beyond: 503 at once
    argon2_concurrency: int = max(1, _cores() // 2)
    #: memory of one argon2id computation in KiB (RFC 9106 low-memory profile);
    #: hashing memory never exceeds argon2_concurrency x this
    argon2_memory_kib: int = 64 * 1024
    argon2_time_cost: int = 3
    #: lanes (= threads) of one computation: 1, so argon2_concurrency bounds cores too
    argon2_parallelism: int = 1
    #: passphrase checks a client may fail in a burst, whatever user names it tries
    failure_burst: int = 10
    #: failed checks per second a client regains (its sustained guessing rate)
    failure_refill_per_s: float = 1.0
    #: seconds after a failed login during which the same client and user get 429
    failed_login_delay: float = 1.0
    #: clients and (client, user) pairs remembered for throttling (bounded memory)
    max_tracked_clients: int = 100_000

    # -- key import (hsmbridge/server/importer.py) -----------------------------------
    rsa_min_modulus_bits: int = 1024
    rsa_max_modulus_bits: int = 8192
    rsa_max_prime_bits: int = 4096
    #: public exponents are odd and below 2**this
    rsa_max_exponent_bits: int = 32

    # -- CSR subjects (hsmbridge/server/csr.py) --------------------------------------
    max_subject_alt_names: int = 100
    #: characters of one DistinguishedName field or subjectAltName
    max_name_chars: int = 256


DEFAULT = Limits()
