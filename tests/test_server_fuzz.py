"""Fuzzing the server's request decoding: hostile input is a 4xx, never a 500 or a hang.

Property-based (hypothesis) over each decoder — Basic credentials, JSON
bodies, multipart forms, routes, CSR subjects, JSON and PEM key imports — and
over the whole ASGI app in-process on a real SoftHSM2 token (methods, paths,
headers, bodies; valid credentials some of the time so handlers are reached).

CI runs a bounded number of examples (a few seconds per target). A longer,
coverage-guided run drives the same properties with atheris (the ``fuzz``
extra) and reports executions and crashes; see docs/server.md::

    .venv/bin/python scripts/fuzz_server.py --seconds 600

or, without atheris, more hypothesis examples per target::

    HSMBRIDGE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_server_fuzz.py

Crashers found are kept below as ``@example`` regression cases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hsmbridge
from hsmbridge.server import csr, forms, importer
from hsmbridge.server.app import PREFIX, ROUTES, BridgeApp, Router, build_app, route_table
from hsmbridge.server.auth import parse_basic
from hsmbridge.server.bridge import Bridge, Req
from hsmbridge.server.errors import ApiError
from hsmbridge.server.limits import Limits

EXAMPLES = int(os.environ.get("HSMBRIDGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
b64 = st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())


def _req(body: bytes, headers: dict[str, str] | None = None) -> Req:
    return Req("POST", {}, {}, headers or {}, body, "127.0.0.1", "https://x/api/v1")


def _status(exc: ApiError) -> int:
    assert 400 <= exc.status < 500 and exc.message, (exc.status, exc.message)
    return exc.status


# -- decoders, one by one ----------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=120).map(lambda b: "Basic " + b.hex()))
@example("Basic " + base64.b64encode(b"user\xed\xa0\x80:pw").decode())  # encoded surrogate
@example("Basic " + base64.b64encode(b"\n:x").decode())
def test_basic_credentials(header: str) -> None:
    creds = parse_basic(header)
    if creds is not None:
        user, passphrase = creds
        (user + passphrase).encode("utf-8")  # always encodable: no lone surrogates


@FUZZ
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 5000 + b"]" * 5000)
@example(b'{"a": "\\ud800"}')
@example(b'{"mode": "\xed\xa0\x80"}')
def test_json_bodies(body: bytes) -> None:
    try:
        data = _req(body).json_object({"mode"}, {"message"})
    except ApiError as exc:
        _status(exc)
        return
    json.dumps(data).encode("utf-8")


@FUZZ
@given(
    st.sampled_from(["multipart/form-data; boundary=B", "multipart/form-data", "text/plain"])
    | st.text(max_size=60),
    st.binary(max_size=400)
    | st.lists(
        st.tuples(st.text(max_size=20), st.binary(max_size=60), st.booleans()), max_size=12
    ).map(
        lambda parts: (
            b"".join(
                b'--B\r\nContent-Disposition: form-data; name="'
                + name.encode("utf-8", "surrogatepass")
                + (b'"; filename="f"' if is_file else b'"')
                + b"\r\n\r\n"
                + data
                + b"\r\n"
                for name, data, is_file in parts
            )
            + b"--B--\r\n"
        )
    ),
)
@example("multipart/form-data; boundary=B", b"--B\r\n\r\n\r\n--B--\r\n")  # no disposition
@example("\u0101", b"")  # found by this test: not latin-1 (UnicodeEncodeError before)
def test_multipart_forms(content_type: str, body: bytes) -> None:
    try:
        form = forms.parse_multipart(content_type, body)
    except ApiError as exc:
        _status(exc)
        return
    assert len(form) <= Limits().max_form_parts


ROUTER = Router(route_table())


@FUZZ
@given(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "X"]),
    st.text(max_size=80).map(lambda t: PREFIX + "/" + t) | st.text(max_size=40),
)
@example("GET", PREFIX + "/keys/\n")
def test_routes(method: str, path: str) -> None:
    try:
        ROUTER.resolve(method, path)
    except ApiError as exc:
        assert _status(exc) in (404, 405)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*csr.DN_FIELDS, "subjectAltNames"]),
        st.text(max_size=300) | st.lists(st.text(max_size=40), max_size=120),
    )
)
@example({"commonName": "a\x00b"})
def test_csr_subjects(dn: dict[str, Any]) -> None:
    try:
        csr.check_subject(dn)
    except ApiError as exc:
        _status(exc)


@FUZZ
@given(
    st.sampled_from(["RSA", "EC_P256", "EC_P384", "EC_P521", "Generic", "x"]),
    st.dictionaries(
        st.sampled_from(["primeP", "primeQ", "publicExponent", "data", "other"]),
        b64 | json_scalars,
    )
    | json_values,
)
@example("RSA", {"primeP": base64.b64encode(b"\xff" * 65536).decode(), "primeQ": "Aw=="})
@example("EC_P256", {"data": base64.b64encode(b"\xff" * 4096).decode()})
def test_json_key_import(key_type: str, private: Any) -> None:
    try:
        importer.from_json(key_type, private)
    except ApiError as exc:
        _status(exc)


@FUZZ
@given(
    st.binary(max_size=800).map(
        lambda der: (
            b"-----BEGIN PRIVATE KEY-----\n"
            + base64.encodebytes(der)
            + b"-----END PRIVATE KEY-----\n"
        )
    )
    | st.binary(max_size=300)
)
def test_pem_key_import(pem: bytes) -> None:
    try:
        importer.from_pem(pem)
    except ApiError as exc:
        _status(exc)


# -- the whole app, in process -------------------------------------------------------------


class _InProcess:
    """The ASGI app on a loop thread of its own, with its lifespan started."""

    def __init__(self, app: BridgeApp) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._started = threading.Event()
        self._lifespan: asyncio.Queue[dict[str, str]] | None = None
        self._lifespan_task = asyncio.run_coroutine_threadsafe(self._run_lifespan(), self.loop)
        assert self._started.wait(30), "the app did not start"

    async def _run_lifespan(self) -> None:
        self._lifespan = asyncio.Queue()
        await self._lifespan.put({"type": "lifespan.startup"})

        async def send(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                self._started.set()

        await self.app({"type": "lifespan"}, self._lifespan.get, send)

    def call(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        return asyncio.run_coroutine_threadsafe(
            self._call(method, path, headers, body), self.loop
        ).result(60)

    async def _call(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> int:
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.9", 4711),
            "scheme": "https",
            "server": ("127.0.0.1", 443),
            "root_path": "",
        }
        chunks = [body[:7], body[7:]]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if chunks:
                chunk = chunks.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        status = int(sent[0]["status"])
        if status >= 400:
            payload = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
            assert isinstance(payload.get("message"), str), payload
        return status

    def stop(self) -> None:
        assert self._lifespan is not None
        self.loop.call_soon_threadsafe(self._lifespan.put_nowait, {"type": "lifespan.shutdown"})
        self._lifespan_task.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


ADMIN = ("admin", "fuzz-admin-passphrase")
OPERATOR = ("operator", "fuzz-operator-pass")


def _basic(who: tuple[str, str]) -> bytes:
    return b"Basic " + base64.b64encode(f"{who[0]}:{who[1]}".encode())


def start_app(hsm: hsmbridge.HSM, directory: Path) -> tuple[_InProcess, Bridge]:
    """A provisioned app with an operator and an EC key ``k1``, never throttled."""
    limits = Limits(failure_burst=10**9, failed_login_delay=0.0)
    bridge = Bridge(hsm, directory, None, limits)
    running = _InProcess(build_app(bridge, threads=4))
    json_type = [(b"content-type", b"application/json")]
    provision = {
        "unlockPassphrase": "fuzz-unlock-passphrase",
        "adminPassphrase": ADMIN[1],
        "systemTime": "2026-01-01T00:00:00Z",
    }
    assert (
        running.call("POST", "/api/v1/provision", json_type, json.dumps(provision).encode()) == 204
    )
    admin = [*json_type, (b"authorization", _basic(ADMIN))]
    user = {"realName": "o", "role": "Operator", "passphrase": OPERATOR[1]}
    assert running.call("PUT", "/api/v1/users/operator", admin, json.dumps(user).encode()) == 201
    key = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": "k1"}
    assert running.call("POST", "/api/v1/keys/generate", admin, json.dumps(key).encode()) == 201
    return running, bridge


def stop_app(running: _InProcess, bridge: Bridge) -> None:
    admin = [(b"authorization", _basic(ADMIN))]
    for key_id in [rec.id for rec in bridge.store.list_keys()]:
        running.call("DELETE", f"/api/v1/keys/{key_id}", admin, b"")
    running.stop()
    bridge.close()


@pytest.fixture(scope="module")
def app(pkcs11_hsm: hsmbridge.HSM) -> Iterator[_InProcess]:
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-fuzz-app-"))
    try:
        running, bridge = start_app(pkcs11_hsm, directory)
        try:
            yield running
        finally:
            stop_app(running, bridge)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _fill(template: str, values: list[str]) -> str:
    """The route template with its ``{Name}`` parameters replaced by ``values`` in order."""
    supply = iter(values)
    return PREFIX + re.sub(r"\{\w+\}", lambda _: next(supply, "x"), template)


requests_ = st.tuples(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"]),
    st.tuples(
        st.sampled_from(list(ROUTES)),
        st.lists(st.sampled_from(["k1", "operator", "admin", "t"]) | st.text(max_size=12)),
    ).map(lambda t: _fill(*t)),
    st.sampled_from([None, ADMIN, OPERATOR, ("admin", "wrong-passphrase"), ("", "")]),
    st.sampled_from(["application/json", "multipart/form-data; boundary=B", "text/plain", ""]),
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(
        st.sampled_from(["mode", "message", "length", "commonName", "label", "newId", "type"]),
        json_scalars | b64,
    ).map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(requests_)
@example(("PUT", PREFIX + "/users/x\n", ADMIN, "application/json", b"{}"))
@example(("POST", PREFIX + "/keys/k1/sign", OPERATOR, "application/json", b"[" * 3000))
@example(("POST", PREFIX + "/keys", ADMIN, "multipart/form-data; boundary=B", b"--B\r\n\r\n"))
def test_the_app_never_answers_500(app: _InProcess, request: Any) -> None:
    check_request(app, request)


def check_request(app: _InProcess, request: Any) -> None:
    """Any request: answered, JSON error bodies, never a 500."""
    method, path, who, content_type, body = request
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    if who is not None:
        headers.append((b"authorization", _basic(who)))
    status = app.call(method, path, headers, body)
    assert status < 500 or status in (501, 503), (method, path, status)
