"""Running the bridge: ``serve()`` for the command, ``start_in_thread()`` for tests.

uvicorn serves HTTPS with keep-alive and concurrent requests and stops
gracefully on SIGTERM/SIGINT (it finishes requests in flight); the TLS
handshake, connection caps and header limits are :mod:`.connections`'. Without
a certificate the server makes a self-signed one in the state directory on
first start, reuses it afterwards, and prints its SHA-256 fingerprint for
pinning. The state directory is private (:mod:`.statedir`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from ..api import HSM
from ..errors import ConfigurationError
from . import statedir, tls
from .app import build_app
from .bridge import Bridge
from .control import REBOOT, Control
from .limits import DEFAULT, Limits

log = logging.getLogger("hsmbridge.server")

DEFAULT_THREADS = 64
#: file descriptors kept for everything but client connections (database, token, threads)
_RESERVED_FDS = 256
#: seconds an idle connection gets to answer TLS close_notify at shutdown before it is cut
IDLE_CLOSE_GRACE = 0.2


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"--listen must be HOST:PORT with a port from 1 to 65535 (e.g. 127.0.0.1:8443), "
            f"got {listen!r}"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``, or a ConfigurationError saying why not.

    proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they
    are TCP; without it every response waits ~40 ms for a delayed ACK (Nagle).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {reason}; stop what uses it or choose another "
            "--listen HOST:PORT (the host must be an address of this machine)"
        ) from None
    return sock


def _state_dir(state_dir: str | Path) -> Path:
    state = statedir.prepare(Path(state_dir))  # 0700, files 0600; refused if others can write
    if not os.access(state, os.W_OK | os.X_OK):
        raise ConfigurationError(f"the state directory {str(state)!r} is not writable")
    return state


def _tls_files(
    state_dir: Path, tls_cert: str | Path | None, tls_key: str | Path | None, host: str
) -> tuple[Path, Path]:
    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("give both --tls-cert and --tls-key, or neither")
    if tls_cert is not None and tls_key is not None:
        return tls.check_pem_pair(Path(tls_cert), Path(tls_key))
    names = (host,) if host not in ("0.0.0.0", "::", "") else ()
    return tls.ensure_self_signed(state_dir, names)


def _connections() -> Any:
    try:
        from . import connections
    except ImportError as exc:  # httptools is in the server extra
        raise ConfigurationError(
            f"hsmbridge serve needs the server extra (pip install 'hsmbridge[server]'): {exc}"
        ) from None
    return connections


def _ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server's TLS context (the TLS endpoints load a new identity into it)."""
    try:
        context: ssl.SSLContext = _connections().server_ssl_context(str(cert), str(key))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS certificate {cert} and key {key}: {exc}"
        ) from None
    return context


def _uvicorn_config(app: Any, context: ssl.SSLContext, limits: Limits, **kw: Any) -> Any:
    """uvicorn over :class:`.connections.ConnectionGuard` (which does TLS itself)."""
    import uvicorn

    guard = _connections().ConnectionGuard(limits, context)
    return uvicorn.Config(
        app,
        http=cast(Any, guard.protocol),
        ws="none",
        loop=kw.pop("loop", "asyncio"),
        log_level=kw.pop("log_level", "warning"),
        access_log=False,
        timeout_keep_alive=int(limits.keep_alive_timeout),
        timeout_graceful_shutdown=kw.pop("graceful", 10),
        limit_concurrency=None,  # requests are limited by the app, connections by the guard
        lifespan="on",
        **kw,
    )


def _fit_to_fd_limit(limits: Limits) -> Limits:
    """Raise the soft descriptor limit for ``max_connections``, or lower the cap to fit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = limits.max_connections + _RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(16, soft - _RESERVED_FDS)
        log.warning(
            "open-file limit %d: at most %d client connections (not %d)",
            soft,
            fitted,
            limits.max_connections,
        )
        return replace(limits, max_connections=fitted)
    return limits


def configure_logging() -> None:
    """INFO and above to stderr, unless the embedding program configured logging itself.

    Messages name users, keys and clients, never passphrases, PINs or key material.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def _graceful_server(config: Any) -> Any:
    """A uvicorn server that stops at once and lets ``serve()`` clean up.

    uvicorn re-raises the signal after its graceful shutdown, which would kill
    the process before ``serve()`` closes the database and the HSM session;
    here SIGTERM/SIGINT end ``run()`` normally. And an idle keep-alive TLS
    connection would hold the shutdown for the whole graceful limit: closing
    it sends TLS close_notify and waits for the client's, which an idle client
    never sends. So idle connections are aborted right after the close_notify
    went out, and a restart takes a fraction of a second.
    """
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            loop = asyncio.get_running_loop()
            abort = loop.call_later(IDLE_CLOSE_GRACE, self._abort_idle)
            try:
                await super().shutdown(sockets)
            finally:
                abort.cancel()

        def _abort_idle(self) -> None:
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", None)
                transport = getattr(connection, "transport", None)
                if transport is not None and (cycle is None or cycle.response_complete):
                    transport.abort()

    return Server(config)


def _attach(bridge: Bridge, server: Any, context: ssl.SSLContext, key: Path) -> None:
    """Give the bridge's handlers their hooks into ``server`` and its TLS ``context``."""

    def stop(action: str) -> None:
        server.should_exit = True

    def reload_tls(cert: Path, key: Path) -> None:
        context.load_cert_chain(str(cert), str(key))  # new handshakes use it

    bridge.control = Control(tls_key=key, stop=stop, reload_tls=reload_tls)


def serve(
    hsm_uri: str,
    listen: str,
    state_dir: str | Path,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    pin: str | None = None,
    *,
    threads: int = DEFAULT_THREADS,
    limits: Limits = DEFAULT,
    database: str | None = None,
) -> None:
    """Serve the NetHSM API over the HSM at ``hsm_uri`` until SIGTERM/SIGINT.

    ``pin`` overrides the URI's PIN (else pin-source/pin-env/HSMBRIDGE_PIN).
    ``database`` is a ``postgresql://`` URI shared by replicas (default: SQLite
    in ``state_dir``); it is checked before the HSM is opened.
    """

    import hsmbridge

    configure_logging()
    host, port = _split_listen(listen)
    state = _state_dir(state_dir)
    cert, key = _tls_files(state, tls_cert, tls_key, host)
    sock = _bind(host, port)
    limits = _fit_to_fd_limit(limits)
    options: dict[str, Any] = {"pin": pin} if pin is not None else {}
    if hsm_uri.startswith("pkcs11:"):
        # A PKCS#11 session per request thread: signatures never queue for a session
        # (the pool opens them only as concurrency demands).
        options["max_sessions"] = threads
    try:
        if database:
            from .state_pg import check_conninfo

            check_conninfo(database)
        hsm = hsmbridge.open(hsm_uri, **options)
    except BaseException:
        sock.close()
        raise
    try:
        while True:  # once, and again after each reboot or factory reset
            try:
                bridge = Bridge(hsm, state, cert, limits, database)
            except BaseException:
                sock.close()
                raise
            try:
                print(
                    f"hsmbridge serve: https://{listen}/api/v1 over {hsm.description}", flush=True
                )
                print(f"TLS certificate {cert} fingerprint {tls.fingerprint(cert)}", flush=True)
                print(f"state: {bridge.state} ({bridge.store.description})", flush=True)
                context = _ssl_context(cert, key)
                config = _uvicorn_config(build_app(bridge, threads), context, limits)
                server = _graceful_server(config)
                _attach(bridge, server, context, key)
                server.run(sockets=[sock])
            finally:
                bridge.close()
            if bridge.control.action != REBOOT:
                break
            print("hsmbridge serve: restarting", flush=True)
            cert, key = _tls_files(state, tls_cert, tls_key, host)  # new after a factory reset
            sock = _bind(host, port)  # uvicorn closed the old one
        print("hsmbridge serve: stopped", flush=True)
    finally:
        hsm.close()


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`; ``stop()`` ends it.

    After a reboot or factory reset through the API, ``bridge``, ``cert`` and
    ``fingerprint`` are the new ones (a factory reset makes a new certificate).
    """

    bridge: Bridge
    host: str
    port: int
    cert: Path
    fingerprint: str
    _server: Any
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``https://127.0.0.1:40123/api/v1``."""
        return f"https://{self.host}:{self.port}/api/v1"

    @property
    def hostport(self) -> str:
        """``host:port`` — what the ``nethsm`` SDK takes as its host."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self.bridge.control.action = None  # no restart after this stop
        if self._thread is not None:
            self._thread.join(timeout)
        self.bridge.close()

    def wait_started(self, timeout: float = 30.0) -> None:
        """Wait until the current server accepts connections (after start or a reboot)."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            if self._server.started:
                return
            time.sleep(0.02)
        raise ConfigurationError(f"the bridge server did not start within {timeout}s")


def start_in_thread(
    hsm: HSM,
    state_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    threads: int = DEFAULT_THREADS,
    limits: Limits = DEFAULT,
    startup_timeout: float = 30.0,
    database: str | None = None,
) -> RunningServer:
    """Serve ``hsm`` from a background thread of this process (port 0: a free one).

    The caller keeps ownership of ``hsm`` (for full speed, a PKCS#11 handle
    opened with ``max_sessions`` >= ``threads``). Returns once the server
    accepts connections.
    """
    state = _state_dir(state_dir)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]

    def make() -> tuple[Bridge, Any, Path]:
        cert, key = _tls_files(state, tls_cert, tls_key, host)
        bridge = Bridge(hsm, state, cert, limits, database)
        context = _ssl_context(cert, key)
        config = _uvicorn_config(build_app(bridge, threads), context, limits, graceful=1)
        server = _graceful_server(config)
        _attach(bridge, server, context, key)
        return bridge, server, cert

    bridge, server, cert = make()
    running = RunningServer(bridge, host, bound_port, cert, tls.fingerprint(cert), server)

    def loop(sock: socket.socket) -> None:
        while True:
            running._server.run(sockets=[sock])
            if running.bridge.control.action != REBOOT:
                return
            running.bridge.close()
            sock = _bind(host, bound_port)  # uvicorn closed the old one
            running.bridge, running._server, running.cert = make()
            running.fingerprint = tls.fingerprint(running.cert)

    running._thread = threading.Thread(
        target=loop, args=(sock,), name="hsmbridge-serve", daemon=True
    )
    running._thread.start()
    try:
        running.wait_started(startup_timeout)
    except ConfigurationError:
        server.should_exit = True
        running._thread.join(5)
        bridge.close()
        raise
    return running
