"""The server under attack, over real sockets: every class of issue 13's review findings.

Connections that never send anything, send headers byte by byte or send too
many of them; bodies sent without credentials; argon2 floods; parallel
guesses; another client's failures from the same address; huge numbers in
imported keys; hostile JSON, IDs and CSR subjects. Clients that must keep
working connect from another loopback address (127.0.0.2) than the attacker
(127.0.0.1), as two hosts would.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmbridge.server.limits import Limits
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

Factory = Callable[..., BridgeServer]
ATTACKER, CLIENT = "127.0.0.1", "127.0.0.2"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _context(bridge: BridgeServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=bridge.ca_file)


def tls_socket(bridge: BridgeServer, source: str = ATTACKER) -> ssl.SSLSocket:
    """A TLS connection with the handshake done, from ``source``."""
    raw = socket.create_connection(
        (bridge.server.host, bridge.server.port), timeout=TIMEOUT, source_address=(source, 0)
    )
    return _context(bridge).wrap_socket(raw, server_hostname=bridge.server.host)


def connection(bridge: BridgeServer, source: str = CLIENT) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        bridge.server.host,
        bridge.server.port,
        context=_context(bridge),
        timeout=TIMEOUT,
        source_address=(source, 0),
    )


def request(
    bridge: BridgeServer,
    method: str,
    path: str,
    body: Any = None,
    auth: tuple[str, str] | None = None,
    source: str = CLIENT,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """One request on a new connection: (status, JSON body or None)."""
    conn = connection(bridge, source)
    try:
        hdrs = dict(headers or {})
        data = body
        if body is not None and not isinstance(body, bytes | str):
            data = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        conn.request(method, f"/api/v1{path}", body=data, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        parsed = json.loads(raw) if raw.startswith(b"{") else None
        return response.status, parsed
    finally:
        conn.close()


def read_until_closed(sock: ssl.SSLSocket, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (at most ``limit`` s)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    return data


def parallel(n: int, func: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = func(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@contextmanager
def sockets(opened: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


# -- connections ---------------------------------------------------------------------


def test_idle_connections_do_not_take_the_server(bridge_factory: Factory) -> None:
    """Connections that finish TLS and send nothing: capped per client, closed after the
    header deadline, never counted as requests (uvicorn's limit counted them: 503)."""
    limits = Limits(header_timeout=4.0, connections_per_client=24)
    bridge = bridge_factory(provision=False, limits=limits, threads=4)
    idle: list[socket.socket] = []
    refused = 0
    with sockets(idle):
        for _ in range(100):
            try:
                idle.append(tls_socket(bridge))
            except (ConnectionError, ssl.SSLError, OSError):
                refused += 1  # the server closed it at accept
        assert len(idle) <= limits.connections_per_client, (len(idle), refused)
        for _ in range(5):  # another client is served while the idle ones stay open
            status, body = request(bridge, "GET", "/health/state")
            assert status == 200 and body == {"state": "Unprovisioned"}
        # the header deadline closes every idle connection
        assert all(read_until_closed(s, 15) == b"" for s in idle)


def _trickle(s: ssl.SSLSocket, limit: float = 15) -> bytes:
    """Send header bytes slowly, never ending the headers; what the server answers."""
    s.sendall(b"GET /api/v1/health/state HTTP/1.1\r\nHost: x\r\n")
    start, answer = time.monotonic(), b""
    with pytest.raises((BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError)):
        while time.monotonic() - start < limit:
            s.sendall(b"X")  # never the blank line that ends the headers
            s.settimeout(0.3)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk:
                raise ConnectionResetError("closed")
    return answer


@pytest.mark.parametrize("after_a_request", [False, True])
def test_slow_headers_are_cut_off(bridge_factory: Factory, after_a_request: bool) -> None:
    """Headers trickling in a byte at a time get 408 at the header deadline, on a new
    connection and on a keep-alive one after a complete request."""
    bridge = bridge_factory(provision=False, limits=Limits(header_timeout=1.5))
    with sockets([tls_socket(bridge)]) as (s,):
        if after_a_request:
            s.sendall(b"GET /api/v1/health/state HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(TIMEOUT)
            first = b""
            while not first.endswith(b'{"state":"Unprovisioned"}'):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
        answer = _trickle(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"headers did not arrive" in answer


def test_slow_bodies_are_cut_off(bridge_factory: Factory) -> None:
    bridge = bridge_factory(provision=False, limits=Limits(body_timeout=1.5))
    with sockets([tls_socket(bridge)]) as (s,):
        s.sendall(
            b"POST /api/v1/provision HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"unlockPassphrase": '
        )
        answer = read_until_closed(s, 15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body did not arrive" in answer
    assert request(bridge, "GET", "/health/state")[1] == {"state": "Unprovisioned"}


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ("".join(f"X-H{i}: v\r\n" for i in range(100)), "header lines"),
        (f"X-Big: {'a' * 20000}\r\n", "bytes"),
    ],
)
def test_header_limits(bridge_factory: Factory, extra: str, what: str) -> None:
    bridge = bridge_factory(provision=False)
    with sockets([tls_socket(bridge)]) as (s,):
        s.sendall(f"GET /api/v1/health/state HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        answer = read_until_closed(s, TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"].find(what) > 0


def test_idle_keep_alive_connections_make_room_at_the_total_cap(bridge_factory: Factory) -> None:
    limits = Limits(max_connections=6, connections_per_client=100)
    bridge = bridge_factory(provision=False, limits=limits)
    kept = [connection(bridge) for _ in range(6)]
    try:
        for conn in kept:  # one request each, then idle keep-alive
            conn.request("GET", "/api/v1/health/state")
            assert conn.getresponse().read()
        for _ in range(3):  # new clients get in: the longest-idle connections are closed
            assert request(bridge, "GET", "/health/state")[0] == 200
    finally:
        for conn in kept:
            conn.close()


def test_requests_are_limited_not_connections(bridge_factory: Factory) -> None:
    """Requests in progress (here: bodies still arriving) count; beyond the limit 503."""
    bridge = bridge_factory(limits=Limits(max_requests=2))
    op = bridge.operator.auth
    assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200  # login cached
    token = base64.b64encode(f"{op[0]}:{op[1]}".encode()).decode()
    slow = []
    with sockets(slow):
        for _ in range(2):
            s = tls_socket(bridge, CLIENT)
            s.sendall(
                b"POST /api/v1/random HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Basic " + token.encode() + b"\r\nContent-Length: 20\r\n\r\n{"
            )
            slow.append(s)
        time.sleep(0.5)  # both admitted and waiting for their bodies
        status, body = request(bridge, "POST", "/random", {"length": 4}, op)
        assert status == 503 and body is not None and "request limit" in body["message"]
        for s in slow:  # finish them: answered normally
            s.sendall(b'"length": 4}       ')
            assert read_until_closed(s, 2).startswith(b"HTTP/1.1 200")
    assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200


# -- bodies --------------------------------------------------------------------------


def _multipart_head(path: str, length: int, auth: tuple[str, str] | None = None) -> bytes:
    lines = [
        f"POST /api/v1{path} HTTP/1.1",
        "Host: x",
        "Content-Type: multipart/form-data; boundary=B",
        f"Content-Length: {length}",
    ]
    if auth:
        lines.append(
            "Authorization: Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_no_body_is_read_before_authentication(bridge_server: BridgeServer) -> None:
    """A 1 GB multipart upload without credentials: 401 after the headers, connection closed."""
    with sockets([tls_socket(bridge_server, CLIENT)]) as (s,):
        s.sendall(_multipart_head("/keys", 1 << 30))
        try:
            s.sendall(b"--B\r\nContent-Disposition: form-data; name=key_file\r\n\r\n")
            s.sendall(b"x" * 65536)
        except (OSError, ssl.SSLError):
            pass  # the server answered and closed before all of it was sent
        answer = read_until_closed(s, TIMEOUT)  # no more body is sent: the server must answer
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"connection: close" in answer.lower()


def test_one_body_cap_for_every_content_type(bridge_server: BridgeServer) -> None:
    admin = bridge_server.admin.auth
    assert request(bridge_server, "GET", "/keys", auth=admin, source=CLIENT)[0] == 200
    with sockets([tls_socket(bridge_server, CLIENT)]) as (s,):
        s.sendall(_multipart_head("/keys", 3 << 20, admin))
        answer = read_until_closed(s, TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # forms are parsed only where the route takes one
    status, body = request(
        bridge_server,
        "POST",
        "/keys/generate",
        b"--B\r\nContent-Disposition: form-data; name=type\r\n\r\nRSA\r\n--B--\r\n",
        admin,
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert status == 400 and body is not None and "JSON" in body["message"]


# -- passphrases ---------------------------------------------------------------------


def test_argon2_verifications_are_bounded(bridge_factory: Factory) -> None:
    """Unknown users with new passphrases, in parallel: beyond one argon2 slot, 503 at once."""
    bridge = bridge_factory(limits=Limits(argon2_concurrency=1, failure_burst=100))
    statuses = parallel(
        16, lambda i: request(bridge, "GET", "/keys", auth=(uid("nobody"), f"guess-{i}-pass"))[0]
    )
    counts = Counter(statuses)
    assert set(counts) <= {401, 503} and counts[503] >= 1, counts


def test_failure_budget_does_not_depend_on_the_user_name(bridge_factory: Factory) -> None:
    bridge = bridge_factory(limits=Limits(failure_burst=3, failure_refill_per_s=0.001))
    op = bridge.operator.auth
    assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200  # cached
    for i in range(3):
        assert request(bridge, "GET", "/keys", auth=(uid("u"), f"wrong-pass-{i}"))[0] == 401
    status, body = request(bridge, "GET", "/keys", auth=(uid("u"), "wrong-pass-x"))
    assert status == 429 and body is not None and "your address" in body["message"]
    # a login verified before is not throttled by failures from its address
    assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200
    # another address has its own budget
    assert request(bridge, "GET", "/keys", auth=bridge.admin.auth, source=ATTACKER)[0] == 200


def test_parallel_guesses_are_checked_one_at_a_time(bridge_factory: Factory) -> None:
    bridge = bridge_factory(limits=Limits(failed_login_delay=3600.0))
    statuses = parallel(
        30,
        lambda i: request(bridge, "GET", "/users/operator", auth=("operator", f"guess-{i:02}-x"))[
            0
        ],
    )
    assert Counter(statuses) == {401: 1, 429: 29}
    # the same passphrase in parallel is checked once and shared: all succeed
    admin = bridge.admin.auth
    user = uid("fresh")
    body = {"realName": "f", "role": "Operator", "passphrase": "fresh-passphrase"}
    assert request(bridge, "PUT", f"/users/{user}", body, admin)[0] == 201
    statuses = parallel(
        12, lambda i: request(bridge, "GET", f"/users/{user}", auth=(user, "fresh-passphrase"))[0]
    )
    assert statuses == [200] * 12


def test_parallel_unlock_guesses_are_checked_one_at_a_time(bridge_factory: Factory) -> None:
    bridge = bridge_factory(limits=Limits(failed_login_delay=3600.0))
    assert request(bridge, "POST", "/lock", auth=bridge.admin.auth)[0] == 204
    statuses = parallel(
        10, lambda i: request(bridge, "POST", "/unlock", {"passphrase": f"wrong-unlock-{i}"})[0]
    )
    assert Counter(statuses) == {403: 1, 429: 9}


def test_a_verified_login_is_not_throttled_by_failures_of_others(
    bridge_factory: Factory,
) -> None:
    bridge = bridge_factory(limits=Limits(failed_login_delay=3600.0))
    op = bridge.operator.auth
    assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200
    for _ in range(3):  # someone else, same address, same user name, wrong passphrase
        assert request(bridge, "GET", "/keys", auth=("operator", "not-the-passphrase"))[0] in (
            401,
            429,
        )
        assert request(bridge, "POST", "/random", {"length": 4}, op)[0] == 200


# -- validation ----------------------------------------------------------------------


def test_ids_with_a_trailing_newline_are_refused(bridge_server: BridgeServer) -> None:
    admin = bridge_server.admin.auth
    body = {"realName": "x", "role": "Administrator", "passphrase": "look-alike-pass"}
    assert request(bridge_server, "PUT", "/users/operator%0A", body, admin)[0] == 400
    key = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": "abc\n"}
    assert request(bridge_server, "POST", "/keys/generate", key, admin)[0] == 400
    assert request(bridge_server, "PUT", "/users/operator/tags/t%0A", None, admin)[0] == 400


def test_malformed_json_is_400_even_unauthenticated(bridge_factory: Factory) -> None:
    bridge = bridge_factory(provision=False)
    good = {
        "unlockPassphrase": "unlock-passphrase",
        "adminPassphrase": "admin-passphrase",
        "systemTime": "2026-01-01T00:00:00Z",
    }
    nested = "[" * 30_000 + "]" * 30_000  # under the 64 KiB public body cap
    surrogate = json.dumps(good).replace("admin-passphrase", "admin-\\ud800-passphrase")
    for body in (nested, '{"a":' * 40 + "1" + "}" * 40, surrogate):
        status, answer = request(
            bridge, "POST", "/provision", body, headers={"Content-Type": "application/json"}
        )
        assert status == 400 and answer is not None and "message" in answer, (status, answer)
    assert request(bridge, "GET", "/health/state")[1] == {"state": "Unprovisioned"}


def test_operators_cannot_tell_which_users_exist(bridge_server: BridgeServer) -> None:
    op = bridge_server.operator.auth
    for path in ("/users/admin", f"/users/{uid('nobody')}", f"/users/{uid('nobody')}/tags"):
        status, body = request(bridge_server, "GET", path, auth=op)
        assert status == 403 and body is not None and "their own user" in body["message"]


def test_csr_subjects_are_bounded(bridge_server: BridgeServer) -> None:
    admin = bridge_server.admin.auth
    key_id = uid("csr")
    key = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": key_id}
    assert request(bridge_server, "POST", "/keys/generate", key, admin)[0] == 201
    try:
        for dn, text in (
            ({"commonName": "a\x00b"}, "control"),
            ({"commonName": "x", "subjectAltNames": [f"h{i}.example" for i in range(101)]}, "100"),
            ({"commonName": "x" * 300}, "longer"),
        ):
            status, body = request(bridge_server, "POST", f"/keys/{key_id}/csr.pem", dn, admin)
            assert status == 400 and body is not None and text in body["message"], body
        ok = {"commonName": "x", "subjectAltNames": ["a.example", "IP:127.0.0.1"]}
        assert request(bridge_server, "POST", f"/keys/{key_id}/csr.pem", ok, admin)[0] == 200
    finally:
        request(bridge_server, "DELETE", f"/keys/{key_id}", auth=admin)


# -- key import ----------------------------------------------------------------------


def _b64int(value: int) -> str:
    return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode()


def test_import_bounds_numbers_before_arithmetic(bridge_server: BridgeServer) -> None:
    admin = bridge_server.admin.auth
    huge = (1 << (64 * 1024 * 8)) - 1  # the review's 64 KiB "prime": 21 s of CPU before
    real = rsa.generate_private_key(65537, 2048).private_numbers()
    cases = [
        ({"primeP": _b64int(huge), "primeQ": _b64int(real.q)}, "at most 4096"),
        ({"primeP": _b64int(real.p), "primeQ": _b64int(real.q)}, None),
        ({"primeP": _b64int(real.p), "primeQ": _b64int(real.p)}, "different primes"),
        ({"primeP": _b64int(real.p), "primeQ": _b64int(real.q + 2)}, "primes"),
        ({"primeP": _b64int(real.p), "primeQ": _b64int(real.q), "publicExponent": "AgA="}, "odd"),
    ]
    for private, text in cases:
        body = {
            "type": "RSA",
            "mechanisms": ["RSA_Signature_PKCS1"],
            "private": {"publicExponent": "AQAB", **private},
        }
        key_id = uid("imp")
        status, answer = request(bridge_server, "PUT", f"/keys/{key_id}", body, admin)
        if text is None:
            assert status == 204, answer
            request(bridge_server, "DELETE", f"/keys/{key_id}", auth=admin)
        else:
            assert status == 400 and answer is not None and text in answer["message"], answer


def _fake_rsa_pem(p: int, q: int) -> bytes:
    """A PKCS#1 PEM with the given 'primes' (the other numbers are nonsense)."""
    der = asn1_keys.RSAPrivateKey(
        {
            "version": "two-prime",
            "modulus": p * q,
            "public_exponent": 65537,
            "private_exponent": 3,
            "prime1": p,
            "prime2": q,
            "exponent1": 1,
            "exponent2": 1,
            "coefficient": 1,
        }
    ).dump()
    return bytes(asn1_pem.armor("RSA PRIVATE KEY", der))


def test_pem_import_is_bounded_and_rebuilt_from_primes(bridge_server: BridgeServer) -> None:
    admin = bridge_server.admin.auth
    big = (1 << 5000) + 1  # a 10,000-bit modulus
    real = rsa.generate_private_key(65537, 2048)
    numbers = real.private_numbers()
    for pem, status_text in (
        (_fake_rsa_pem(big, big + 2), "bits"),
        (_fake_rsa_pem(numbers.p, numbers.q), None),  # wrong d and CRT values: recomputed
        (
            real.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            None,
        ),
    ):
        form = (
            b"--B\r\nContent-Disposition: form-data; name=arguments\r\n\r\n"
            b'{"mechanisms": ["RSA_Signature_PKCS1"]}\r\n'
            b'--B\r\nContent-Disposition: form-data; name=key_file; filename="k.pem"\r\n\r\n'
            + pem
            + b"\r\n--B--\r\n"
        )
        key_id = uid("pem")
        status, answer = request(
            bridge_server,
            "PUT",
            f"/keys/{key_id}",
            form,
            admin,
            headers={"Content-Type": "multipart/form-data; boundary=B"},
        )
        if status_text is None:
            assert status == 204, answer
            request(bridge_server, "DELETE", f"/keys/{key_id}", auth=admin)
        else:
            assert status == 400 and answer is not None and status_text in answer["message"]


def test_four_lane_hashes_are_rehashed_to_one_lane(bridge_factory: Factory) -> None:
    """A hash from before (argon2-cffi's default, 4 lanes = 4 threads per check) is replaced
    at the next successful login, so one check is one thread; a changed hash is kept."""
    import argon2

    bridge = bridge_factory()
    store = bridge.server.bridge.store
    old_hasher = argon2.PasswordHasher(parallelism=4)
    user = store.get_user("operator")
    assert user is not None
    old_hash = old_hasher.hash(bridge.operator.passphrase)
    store.update_user(dataclasses.replace(user, pass_hash=old_hash))
    assert request(bridge, "POST", "/random", {"length": 4}, bridge.operator.auth)[0] == 200
    user = store.get_user("operator")
    assert user is not None and argon2.extract_parameters(user.pass_hash).parallelism == 1
    assert request(bridge, "POST", "/random", {"length": 4}, bridge.operator.auth)[0] == 200
    assert not store.replace_hash("operator", old_hash, "not-applied")  # changed meanwhile
