"""Running the bridge: ``serve()`` for the command, ``start_in_thread()`` for tests.

uvicorn serves HTTPS with keep-alive and concurrent requests and stops
gracefully on SIGTERM/SIGINT (it finishes requests in flight). Without a
certificate the server makes a self-signed one in the state directory on first
start, reuses it afterwards, and prints its SHA-256 fingerprint for pinning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import HSM
from ..errors import ConfigurationError
from . import tls
from .app import build_app
from .bridge import Bridge

log = logging.getLogger("hsmbridge.server")

DEFAULT_THREADS = 64


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
    state = Path(state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the state directory {str(state)!r}: {exc.strerror}; "
            "create it, or give a writable --state-dir"
        ) from None
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


def _http_parser() -> str:
    """uvicorn's HTTP implementation: httptools when installed, else h11.

    Every signature is one request and one event-loop thread parses them all;
    httptools (C) takes that thread's cost per request from ~0.55 to ~0.35 ms.
    (uvloop was measured too and did not help, so the loop stays asyncio.)
    """
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def _uvicorn_config(app: Any, cert: Path, key: Path, threads: int, **kw: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        http=kw.pop("http", _http_parser()),
        loop=kw.pop("loop", "asyncio"),
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level=kw.pop("log_level", "warning"),
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=kw.pop("graceful", 10),
        limit_concurrency=threads * 16,
        lifespan="on",
        **kw,
    )


def _graceful_server(config: Any) -> Any:
    """A uvicorn server whose SIGTERM/SIGINT end ``run()`` normally.

    uvicorn re-raises the signal after its graceful shutdown, which would kill
    the process before ``serve()`` closes the database and the HSM session.
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

    return Server(config)


def serve(
    hsm_uri: str,
    listen: str,
    state_dir: str | Path,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    pin: str | None = None,
    *,
    threads: int = DEFAULT_THREADS,
    database: str | None = None,
) -> None:
    """Serve the NetHSM API over the HSM at ``hsm_uri`` until SIGTERM/SIGINT.

    ``pin`` overrides the URI's PIN (else pin-value/pin-source/HSMBRIDGE_PIN).
    ``database`` is a ``postgresql://`` URI shared by replicas (default: SQLite
    in ``state_dir``); it is checked before the HSM is opened.
    """

    import hsmbridge

    host, port = _split_listen(listen)
    state = _state_dir(state_dir)
    cert, key = _tls_files(state, tls_cert, tls_key, host)
    sock = _bind(host, port)
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
        bridge = Bridge(hsm, state, cert, database)
    except BaseException:
        sock.close()
        hsm.close()
        raise
    try:
        print(f"hsmbridge serve: https://{listen}/api/v1 over {hsm.description}", flush=True)
        print(f"TLS certificate {cert} fingerprint {tls.fingerprint(cert)}", flush=True)
        print(f"state: {bridge.state} ({bridge.store.description})", flush=True)
        config = _uvicorn_config(build_app(bridge, threads), cert, key, threads)
        _graceful_server(config).run(sockets=[sock])
        print("hsmbridge serve: stopped", flush=True)
    finally:
        bridge.close()
        hsm.close()


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`; ``stop()`` ends it."""

    bridge: Bridge
    host: str
    port: int
    cert: Path
    fingerprint: str
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``https://127.0.0.1:40123/api/v1``."""
        return f"https://{self.host}:{self.port}/api/v1"

    @property
    def hostport(self) -> str:
        """``host:port`` — what the ``nethsm`` SDK takes as its host."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.bridge.close()


def start_in_thread(
    hsm: HSM,
    state_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    threads: int = DEFAULT_THREADS,
    startup_timeout: float = 30.0,
    database: str | None = None,
) -> RunningServer:
    """Serve ``hsm`` from a background thread of this process (port 0: a free one).

    The caller keeps ownership of ``hsm`` (for full speed, a PKCS#11 handle
    opened with ``max_sessions`` >= ``threads``). Returns once the server
    accepts connections.
    """
    import uvicorn

    state = _state_dir(state_dir)
    cert, key = _tls_files(state, tls_cert, tls_key, host)
    sock = _bind(host, port)
    bridge = Bridge(hsm, state, cert, database)
    bound_port = sock.getsockname()[1]
    config = _uvicorn_config(build_app(bridge, threads), cert, key, threads, graceful=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="hsmbridge-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while thread.is_alive() and not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        thread.join(5)
        bridge.close()
        raise ConfigurationError(f"the bridge server did not start within {startup_timeout}s")
    return RunningServer(bridge, host, bound_port, cert, tls.fingerprint(cert), server, thread)
