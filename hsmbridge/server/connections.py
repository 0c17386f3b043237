"""Connections before the ASGI app: TLS, deadlines, per-client and total caps, header limits.

uvicorn alone arms no timer on a connection until its first response, counts
idle keep-alive connections against its concurrency limit and takes headers of
any size, so a client that opens connections and sends nothing (or one byte at
a time) can take the server away from everyone else. Here:

- :class:`ConnectionGuard` admits a TCP connection only while its client
  (address; IPv6 by /64) has fewer than ``connections_per_client`` and the
  server fewer than ``max_connections`` open (at the cap, the longest-idle
  keep-alive connection is closed to make room); it then does the TLS
  handshake itself (``loop.start_tls``), so handshaking connections count too.
- The handshake and the first request's headers must be done within
  ``header_timeout`` of the accept; every later request's headers within
  ``header_timeout`` of its first byte, and a body within ``body_timeout`` of
  the end of its headers (else 408); an idle keep-alive connection closes
  after ``keep_alive_timeout``.
- :class:`HttpConnection` (uvicorn's httptools protocol) answers 431 for more
  than ``max_headers`` header lines or ``max_headers_bytes`` of request line
  and headers, before the app sees the request, and every protocol-level error
  is a JSON ``{"message": ...}`` body like the API's own.

Requests (not connections) are limited in :mod:`hsmbridge.server.app`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from collections import Counter
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .limits import Limits

log = logging.getLogger("hsmbridge.server")


def client_key(address: str | None) -> str:
    """Who a connection or request is accounted to: its address, IPv6 by /64."""
    if not address:
        return "unknown"
    if ":" not in address:  # IPv4, as the socket reports it: already canonical
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ with the default (forward-secret, AEAD) ciphers of Python's ssl module."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class _Refusals:
    """Counts refused connections and logs them at most once per interval (no log floods)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._next = 0.0

    def add(self, reason: str) -> None:
        self._counts[reason] += 1
        now = time.monotonic()
        if now >= self._next:
            summary = ", ".join(f"{n} {why}" for why, n in sorted(self._counts.items()))
            log.warning("refused connections since the last report: %s", summary)
            self._counts.clear()
            self._next = now + self.interval


class ConnectionGuard:
    """The server's connection accounting; its :meth:`protocol` is uvicorn's ``http`` class."""

    def __init__(self, limits: Limits, ssl_context: ssl.SSLContext) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.open_per_client: Counter[str] = Counter()
        self.open = 0
        #: keep-alive connections waiting for their next request, longest idle first
        self.idle: dict[HttpConnection, None] = {}
        self.refusals = _Refusals()
        #: TLS handshakes in progress (asyncio keeps only weak references to tasks)
        self.handshakes: set[asyncio.Task[None]] = set()

    def admit(self, client: str) -> bool:
        if self.open_per_client[client] >= self.limits.connections_per_client:
            self.refusals.add(f"over the per-client cap from {client}")
            return False
        if self.open >= self.limits.max_connections and not self._reclaim_idle():
            self.refusals.add("over the total cap")
            return False
        self.open_per_client[client] += 1
        self.open += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.open_per_client[client] -= 1
        if self.open_per_client[client] <= 0:
            del self.open_per_client[client]

    def _reclaim_idle(self) -> bool:
        for connection in self.idle:
            del self.idle[connection]
            connection.close_idle()
            return True
        return False

    def protocol(self, **uvicorn_args: Any) -> asyncio.Protocol:
        """A new TCP connection's protocol (uvicorn calls this for every accept)."""
        return _Handshake(self, uvicorn_args)


class _Handshake(asyncio.Protocol):
    """A TCP connection until its TLS handshake is done; then an :class:`HttpConnection`."""

    def __init__(self, guard: ConnectionGuard, uvicorn_args: dict[str, Any]) -> None:
        self.guard = guard
        self.uvicorn_args = uvicorn_args

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        client = client_key(peer[0] if isinstance(peer, tuple) else None)
        if not self.guard.admit(client):
            transport.abort()
            return
        transport.pause_reading()  # start_tls takes over reading (no data reaches this object)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.guard.limits.header_timeout
        http = HttpConnection(self.guard, client, deadline, **self.uvicorn_args)
        task = loop.create_task(self._start_tls(loop, transport, http, client, deadline))
        self.guard.handshakes.add(task)
        task.add_done_callback(self.guard.handshakes.discard)

    async def _start_tls(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        http: HttpConnection,
        client: str,
        deadline: float,
    ) -> None:
        try:
            tls = await loop.start_tls(
                transport,
                http,
                self.guard.ssl_context,
                server_side=True,
                ssl_handshake_timeout=max(0.01, deadline - loop.time()),
                # a closing connection waits this long for the client's close_notify
                # (asyncio's default is 30 s, during which the connection still counts)
                ssl_shutdown_timeout=self.guard.limits.header_timeout,
            )
        except BaseException as exc:  # handshake failed, timed out, or the server stops
            transport.abort()
            self.guard.release(client)
            if not isinstance(exc, Exception):
                raise
            log.debug("TLS handshake with %s failed: %r", client, exc)
            return
        if tls is None or tls.is_closing():  # the peer left during the handshake
            transport.abort()
            self.guard.release(client)
            return
        http.connection_made(tls)


class HttpConnection(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines, header limits and
    accounting.

    Deadlines cost nothing in the common case: a timer is armed only when a
    read ends with a request's headers (or body) still incomplete.
    """

    def __init__(
        self, guard: ConnectionGuard, client: str, deadline: float, **uvicorn_args: Any
    ) -> None:
        super().__init__(**uvicorn_args)
        self.guard = guard
        self.client_key = client
        self.limits = guard.limits
        #: decrypted data start_tls delivered before it returned (see connection_made)
        self._early: list[bytes] | None = []
        self._timer: asyncio.TimerHandle | None = None
        self._first_deadline = deadline
        #: between the end of a request (or the connection's start) and the next one's headers
        self._in_headers = True
        self._header_start: float | None = None  # loop time of the headers' first byte
        self._raw_header_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._limit_error: tuple[int, str] | None = None
        self._released = False

    # -- connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = self.loop.call_at(self._first_deadline, self._too_slow)
        # start_tls hands over decrypted data as soon as the handshake ends, which can be
        # before the coroutine that called it resumes and calls this.
        early, self._early = self._early, None
        for chunk in early or ():
            self.data_received(chunk)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.guard.idle.pop(self, None)
        if not self._released:
            self._released = True
            self.guard.release(self.client_key)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Closed by the guard to make room for a new connection."""
        if not self.transport.is_closing():
            self.transport.close()

    # -- requests ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
        self.guard.idle.pop(self, None)
        if self._in_headers:
            if self._header_start is None:
                self._header_start = self.loop.time()
            self._raw_header_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing() or self._timer is not None:
            return
        if self._in_headers:
            if self._raw_header_bytes > self.limits.max_header_bytes:
                self._send_error(431, self._too_large())
            elif self._header_start is not None:
                deadline = self._header_start + self.limits.header_timeout
                self._timer = self.loop.call_at(deadline, self._too_slow)
        elif self.cycle is not None and self.cycle.more_body:
            self._timer = self.loop.call_later(self.limits.body_timeout, self._too_slow)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._limit_error = (431, f"more than {self.limits.max_headers} header lines")
            raise _LimitExceeded
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_start = None
        self._raw_header_bytes = self._header_bytes = self._header_count = 0
        self._cancel_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_headers = True  # what follows is the next request
        self._cancel_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            if not self.pipeline:
                self.guard.idle[self] = None
        elif self.cycle is not None and self.cycle.more_body:
            # answered without reading the body (401, 413, ...): the client may still be
            # sending it; give it a moment to read the answer, then stop reading (and
            # decrypting) the rest
            self.loop.call_later(self.limits.unread_body_linger, self.transport.abort)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, or to a limit hit while parsing."""
        status, message = self._limit_error or (400, "the request is not valid HTTP/1.1")
        self._send_error(status, message)

    # -- limits --------------------------------------------------------------------

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._limit_error = (431, self._too_large())
            raise _LimitExceeded

    def _too_large(self) -> str:
        return f"request line and headers are larger than {self.limits.max_header_bytes} bytes"

    def _too_slow(self) -> None:
        """A deadline passed: headers (or a body) still incomplete, or nothing sent at all."""
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._in_headers:
            secs = self.limits.body_timeout
            self._send_error(408, f"the request body did not arrive within {secs:g} s")
        elif self._raw_header_bytes:
            secs = self.limits.header_timeout
            self._send_error(408, f"the request headers did not arrive within {secs:g} s")
        else:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send_error(self, status: int, message: str) -> None:
        """A JSON error and the end of the connection (the request was not read to its end)."""
        if self.transport.is_closing():
            return
        body = json.dumps({"message": message}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class _LimitExceeded(Exception):
    """Raised from a parser callback to stop parsing; the status is in ``_limit_error``."""
