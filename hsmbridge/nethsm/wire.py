"""Keep-alive HTTPS connections to one NetHSM instance, without an HTTP library on the way.

Every signature is one request, so the client's cost per request bounds a
batch on a machine it shares with the server. Through urllib3's pool and
``http.client`` a request cost ~0.45 ms of client CPU, mostly header objects,
an ``email`` parser for the answer's headers and per-request bookkeeping that
NetHSM needs none of. A :class:`Wire` writes one request (request line,
headers, body) with one ``sendall`` and reads the answer with a buffered
reader: status line, the headers it uses, and a ``Content-Length`` or chunked
body — ~0.15 ms.

The failures keep urllib3's exception types (the TLS stack is the same
``ssl`` module), so :mod:`hsmbridge.nethsm.errors` maps them in one place:
``NewConnectionError``/``ConnectTimeoutError`` (nothing was sent),
``SSLError`` (a refused certificate, never retried), ``ReadTimeoutError`` and
``ProtocolError`` (sent, unanswered).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import select
import socket
import ssl
import threading
from typing import BinaryIO
from urllib.parse import quote

import urllib3.exceptions as u3

from .errors import Answer

#: Longest status line or header line read (as http.client).
MAX_LINE = 65536
#: Most header lines in an answer.
MAX_HEADERS = 100
#: Largest answer body read (bytes): a backup is the largest a NetHSM sends; a
#: longer one is a ProtocolError, not an allocation the size a server claims.
MAX_BODY = 256 * 1024 * 1024
#: Characters sent as they are in a request target; others are percent-encoded.
_TARGET_SAFE = "/?=&%~:@!$'()*+,;-._"


def client_context(verify: bool, ca: str | None, fingerprint: str | None) -> ssl.SSLContext:
    """TLS 1.2+; chain and hostname checked against ``ca`` or ``certifi``'s CAs (as requests
    does) unless only a fingerprint is pinned or verification is off."""
    if ca is not None:
        context = ssl.create_default_context(cafile=ca)
    elif fingerprint is not None or not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        from requests.utils import DEFAULT_CA_BUNDLE_PATH

        context = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Wire:
    """One keep-alive TLS connection, used by one thread at a time."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")

    def dropped(self) -> bool:
        """Whether an idle connection was closed by the server (readable while idle)."""
        poller = select.poll()  # not select(): descriptors above 1023 are fine
        try:
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def exchange(
        self, head: bytes, body: bytes | None, no_body: bool, read_timeout: float
    ) -> tuple[int, bytes, str | None, bool]:
        """Send one request; (status, body, Retry-After, keep the connection)."""
        if self.sock.gettimeout() != read_timeout:
            self.sock.settimeout(read_timeout)
        self.sock.sendall(head + body if body else head)
        reader = self.reader
        while True:
            status, retry_after, length, chunked, keep = self._read_head(reader)
            if status >= 200:
                break  # 1xx answers (100 Continue) come before the real one
        if no_body or status in (204, 304):
            return status, b"", retry_after, keep
        if chunked:
            return status, self._read_chunked(reader), retry_after, keep
        if length is not None:
            data = reader.read(_bounded(length))
            if len(data) != length:
                raise u3.ProtocolError("Connection broken: the answer's body was cut short")
            return status, data, retry_after, keep
        data = reader.read(MAX_BODY + 1)  # until the server closes
        return status, data[: _bounded(len(data))], retry_after, False

    @staticmethod
    def _read_head(reader: BinaryIO) -> tuple[int, str | None, int | None, bool, bool]:
        line = reader.readline(MAX_LINE + 1)
        if not line:
            raise u3.ProtocolError("Connection aborted: the server closed the connection")
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit() or len(line) > MAX_LINE:
            raise u3.ProtocolError(f"not an HTTP/1.x answer: {line[:80]!r}")
        keep = version != b"HTTP/1.0"
        retry_after: str | None = None
        length: int | None = None
        chunked = False
        for _ in range(MAX_HEADERS + 1):
            line = reader.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise u3.ProtocolError("the answer's Content-Length is not a number") from None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep = b"close" not in value.lower() and (keep or b"keep-alive" in value.lower())
            elif name == b"retry-after":
                retry_after = value.strip().decode("latin-1")
        else:
            raise u3.ProtocolError(f"the answer has more than {MAX_HEADERS} header lines")
        if not line:
            raise u3.ProtocolError("Connection broken: the answer's headers were cut short")
        return int(code), retry_after, length, chunked, keep

    @staticmethod
    def _read_chunked(reader: BinaryIO) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = reader.readline(MAX_LINE + 1)
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise u3.ProtocolError("a chunked answer has a bad chunk size") from None
            if size == 0:
                while reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total = _bounded(total + size)
            chunk = reader.read(size + 2)
            if len(chunk) != size + 2:
                raise u3.ProtocolError("Connection broken: a chunk of the answer was cut short")
            parts.append(chunk[:size])

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


def _bounded(length: int) -> int:
    """``length`` if an answer body may be that long, else a ProtocolError."""
    if length < 0:
        raise u3.ProtocolError(f"the answer gives a negative body or chunk length ({length})")
    if length > MAX_BODY:
        raise u3.ProtocolError(
            f"the answer's body is longer than {MAX_BODY} bytes (hsmbridge.nethsm.wire.MAX_BODY)"
        )
    return length


class Wires:
    """The keep-alive connections to one ``host:port``: at most ``maxsize`` kept idle.

    Threads take a connection (the most recently used first), use it for one
    request and put it back; a connection whose request failed is closed.
    """

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, fingerprint: str | None, maxsize: int
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.fingerprint = bytes.fromhex(fingerprint) if fingerprint else None
        self.maxsize = maxsize
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._idle: collections.deque[Wire] = collections.deque()  # append/pop are atomic
        self._lock = threading.Lock()
        self.opened = 0  # connections made, for tests and stats
        self.closed = False

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        timeout: tuple[float, float],
    ) -> Answer:
        """One request on a pooled (or new) connection (``target`` is the whole path)."""
        lines = [f"{method} {quote(target, safe=_TARGET_SAFE)} HTTP/1.1", f"Host: {self.authority}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        wire = self._take(timeout)
        try:
            status, data, retry_after, keep = wire.exchange(
                head, body, method == "HEAD", timeout[1]
            )
        except TimeoutError:
            wire.close()
            raise u3.ReadTimeoutError(
                None,  # type: ignore[arg-type]
                target,
                f"Read timed out. (read timeout={timeout[1]:g})",
            ) from None
        except (OSError, u3.ProtocolError) as exc:
            wire.close()
            if isinstance(exc, u3.ProtocolError):
                raise
            raise u3.ProtocolError(f"Connection aborted: {exc}", exc) from None
        if keep and not self.closed and len(self._idle) < self.maxsize:
            self._idle.append(wire)
        else:
            wire.close()
        return Answer(status, data, {"retry-after": retry_after} if retry_after else {})

    def _take(self, timeout: tuple[float, float]) -> Wire:
        while True:
            try:
                wire = self._idle.pop()
            except IndexError:
                return self._connect(timeout)
            if not wire.dropped():
                return wire
            wire.close()

    def _connect(self, timeout: tuple[float, float]) -> Wire:
        where = f"{self.authority}"
        try:
            raw = socket.create_connection((self.host, self.port), timeout=timeout[0])
        except TimeoutError:
            raise u3.ConnectTimeoutError(
                None, f"Connection to {where} timed out. (connect timeout={timeout[0]:g})"
            ) from None
        except OSError as exc:
            raise u3.NewConnectionError(
                None,  # type: ignore[arg-type]
                f"Failed to establish a new connection to {where}: {exc}",
            ) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLError as exc:
            raw.close()
            raise u3.SSLError(str(exc)) from None
        except TimeoutError:
            raw.close()
            raise u3.ConnectTimeoutError(
                None, f"TLS handshake with {where} timed out. (connect timeout={timeout[0]:g})"
            ) from None
        except OSError as exc:
            raw.close()
            raise u3.NewConnectionError(
                None,  # type: ignore[arg-type]
                f"TLS handshake with {where} failed: {exc}",
            ) from None
        if self.fingerprint is not None:
            # checked right after the handshake: nothing (no Authorization) is sent on a mismatch
            digest = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").digest()
            if not hmac.compare_digest(digest, self.fingerprint):
                sock.close()
                raise u3.SSLError(
                    f'Fingerprints did not match. Expected "{self.fingerprint.hex()}", '
                    f'got "{digest.hex()}"'
                )
        with self._lock:
            self.opened += 1
        return Wire(sock)

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return
