"""Fixtures and real loopback servers for the NetHSM backend's tests.

- :class:`RecordingTLSServer`: a tiny TLS server (``ssl`` + ``socket`` in a
  thread) that records every byte a client sends after the handshake, to
  prove a pinned client sends nothing — no Authorization header — to a server
  whose certificate does not match.
- ``nethsm_hsm``: a :class:`hsmbridge.nethsm.NetHSM` handle on ``hsmbridge
  serve`` over the session's SoftHSM2 token, carrying an Administrator and an
  Operator credential, for the conformance suite.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import hsmbridge
from hsmbridge import HSM
from hsmbridge.nethsm import NetHSM

if TYPE_CHECKING:  # the server extra (starlette, uvicorn) is needed only when a bridge runs
    from hsmbridge.server.testing import BridgeServer


def make_certificate(directory: Path, name: str = "loopback") -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem, sha256 hex)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}-cert.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert_path, key_path, hashlib.sha256(der).hexdigest()


class RecordingTLSServer:
    """A real TLS server on loopback that records what clients send after the handshake.

    Each connection: TLS handshake, then read the HTTP request (or until the
    client closes), record the bytes, answer ``status`` with
    ``body`` (or, with ``answer=False``, nothing) and close. ``handshakes``
    counts completed handshakes, so a test can tell "refused after the
    handshake" from "never connected".
    """

    BODY = b'{"state":"Operational"}'

    def __init__(
        self, cert: Path, key: Path, *, status: int = 200, body: bytes = BODY, answer: bool = True
    ) -> None:
        self.status, self.body, self.answer = status, body, answer
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert), str(key))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.received: list[bytes] = []
        self.handshakes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handlers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RecordingTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    @property
    def requests(self) -> list[bytes]:
        """The request heads received, one per connection that sent anything."""
        with self._lock:
            return [r for r in self.received if r]

    @property
    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            with self._lock:
                self._handlers.append(handler)
            handler.start()

    def settle(self) -> None:
        """Wait until every connection accepted so far has been handled."""
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.join(10)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            with self._context.wrap_socket(conn, server_side=True) as tls:
                with self._lock:
                    self.handshakes += 1
                while b"\r\n\r\n" not in data or len(data) < _request_length(data):
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self._record(data)  # before answering: the client may look right after
                data = b""
                if self.answer:
                    tls.sendall(
                        f"HTTP/1.1 {self.status} Whatever\r\n".encode()
                        + b"Content-Type: application/json\r\n"
                        + f"Content-Length: {len(self.body)}\r\n".encode()
                        + b"Connection: close\r\n\r\n"
                        + self.body
                    )
        except (OSError, ssl.SSLError):
            self._record(data)

    def _record(self, data: bytes) -> None:
        if data:
            with self._lock:
                self.received.append(data)


def _request_length(data: bytes) -> int:
    """Head plus Content-Length: how many bytes the request has (read all before answering)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(head) + 4 + int(value)
    return len(head) + 4


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the bridge server and NetHSM handles on it ---------------------------------------------


def open_nethsm(bridge: BridgeServer, user: str = "admin", **options: Any) -> NetHSM:
    """A handle on ``bridge`` pinned to its certificate, logged in as ``user``.

    As ``admin`` it also carries the operator's credential (so it can generate
    and sign); as ``operator`` it is a plain operator handle.
    """
    who = bridge.admin if user == "admin" else bridge.operator
    if user == "admin":
        options.setdefault("operator", bridge.operator.auth)
    options.setdefault("fingerprint", bridge.fingerprint)
    hsm = hsmbridge.open(
        f"nethsm://{who.user}@{bridge.hostport}", password=who.passphrase, **options
    )
    assert isinstance(hsm, NetHSM)
    return hsm


_bridges: dict[int, BridgeServer] = {}


def bridge_of(hsm: NetHSM) -> BridgeServer:
    """The bridge server a ``nethsm_hsm`` handle talks to."""
    return _bridges[id(hsm)]


@pytest.fixture(scope="session")
def nethsm_hsm(request: pytest.FixtureRequest, pkcs11_hsm: HSM) -> Iterator[NetHSM]:
    """A NetHSM handle that can generate, list, sign, decrypt and delete.

    It talks to the session's ``bridge_server`` when that fixture is
    registered, else to a bridge of its own over the same SoftHSM2 token.
    """
    own: BridgeServer | None = None
    try:
        bridge: BridgeServer = request.getfixturevalue("bridge_server")
    except pytest.FixtureLookupError:
        from hsmbridge.server.testing import start_bridge

        directory = Path(tempfile.mkdtemp(prefix="hsmbridge-nethsm-"))
        own = bridge = start_bridge(pkcs11_hsm, directory, True)
    hsm = open_nethsm(bridge)
    _bridges[id(hsm)] = bridge
    try:
        yield hsm
    finally:
        _bridges.pop(id(hsm), None)
        hsm.close()
        if own is not None:
            own.stop()
            shutil.rmtree(own.state_dir, ignore_errors=True)
