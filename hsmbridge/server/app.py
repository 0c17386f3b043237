"""The ASGI app: NetHSM REST API v1 routes over a :class:`Bridge`.

Each route names its handler, the roles allowed to call it, the states it
works in and whether it takes a body (and whether that may be a form). A
request is admitted only while fewer than ``max_requests`` are in progress
(idle connections do not count: :mod:`hsmbridge.server.connections` limits
those); then the state is checked and the caller authenticated *before* any
body is read, so nobody without credentials can make the server read, buffer
or parse more than a header. Bodies have one size cap whatever their content
type (``max_public_body`` on the unauthenticated routes) and a time limit
(the connection's), and are parsed — JSON, or multipart only on the routes that take forms — in a
worker thread with the handler (HSM calls and argon2 block). A response to a
request whose body was not read closes the connection. Every error becomes
NetHSM's ``{"message": ...}`` body in one place.

Every signature is one HTTP request, and the one event-loop thread parses all
of them, so the app is a small ASGI callable of its own rather than Starlette's
router and middleware stack: routes are compiled once and looked up by their
first path segment, credentials verified before are recognised on the event
loop (an HMAC, no I/O), and handlers run on a plain thread pool. Starlette
still renders the responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from starlette.datastructures import URL, Headers
from starlette.responses import JSONResponse, Response

from ..errors import HSMError
from . import (
    api_config,
    api_keys,
    api_maintenance,
    api_namespaces,
    api_system,
    api_tls,
    api_users,
    forms,
    namespaces,
)
from .bridge import LOCKED, OPERATIONAL, UNPROVISIONED, Bridge, Req
from .connections import client_key
from .errors import ApiError, from_hsm_error, not_implemented
from .state import UserRecord
from .workers import Workers

log = logging.getLogger("hsmbridge.server")

PREFIX = "/api/v1"
ANY_STATE = (UNPROVISIONED, LOCKED, OPERATIONAL)
ADMIN = ("Administrator",)
OPERATOR = ("Operator",)
ADMIN_OR_OPERATOR = ("Administrator", "Operator")

Handler = Callable[[Bridge, Req], Response]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: what a route reads: nothing, a body (JSON or bytes), a body that may be a form, or a
#: backup upload (a form whose ``backup_file`` part is bytes, up to ``max_backup_body``)
Body = Literal["none", "data", "form", "backup"]
NO_BODY: Body = "none"
DATA: Body = "data"
FORM: Body = "form"
BACKUP: Body = "backup"
UNPROV = (UNPROVISIONED,)
NOT_OPERATIONAL = (UNPROVISIONED, LOCKED)


@dataclass(frozen=True)
class Op:
    handler: Handler
    roles: tuple[str, ...] | None  # None: public, no authentication
    states: tuple[str, ...] = (OPERATIONAL,)
    body: Body = NO_BODY
    #: states in which the route needs no authentication (the spec's restore, shutdown)
    public_in: tuple[str, ...] = ()
    #: whether users of a namespace may call it (users, keys, random); the rest is root-only
    namespaced: bool = False

    def roles_in(self, state: str) -> tuple[str, ...] | None:
        """The roles that may call it in ``state``; None: anyone, unauthenticated."""
        return None if state in self.public_in else self.roles


S, U, K, N = api_system, api_users, api_keys, api_namespaces
C, M, T = api_config, api_maintenance, api_tls

#: path -> method -> operation. Order matters: ``/keys/{KeyPrefix}*`` before ``/keys/{KeyID}``.
ROUTES: dict[str, dict[str, Op]] = {
    "/info": {"GET": Op(S.info, None, ANY_STATE)},
    "/health/alive": {"GET": Op(S.health_alive, None, ANY_STATE)},
    "/health/ready": {"GET": Op(S.health_ready, None, ANY_STATE)},
    "/health/state": {"GET": Op(S.health_state, None, ANY_STATE)},
    "/provision": {"POST": Op(S.provision, None, (UNPROVISIONED,), DATA)},
    "/unlock": {"POST": Op(S.unlock, None, (LOCKED,), DATA)},
    "/lock": {"POST": Op(S.lock, ADMIN)},
    "/random": {"POST": Op(S.random, OPERATOR, body=DATA, namespaced=True)},
    "/metrics": {"GET": Op(S.metrics, ("Metrics",))},
    "/system/info": {"GET": Op(S.system_info, ADMIN)},
    "/system/backup": {"POST": Op(M.make_backup, ("Backup",))},
    "/system/restore": {
        "POST": Op(M.restore, ADMIN, (UNPROVISIONED, OPERATIONAL), BACKUP, public_in=UNPROV)
    },
    "/system/reboot": {"POST": Op(M.reboot, ADMIN)},
    "/system/shutdown": {"POST": Op(M.shutdown, ADMIN, ANY_STATE, public_in=NOT_OPERATIONAL)},
    "/system/factory-reset": {"POST": Op(M.factory_reset, ADMIN)},
    "/config/unlock-passphrase": {"PUT": Op(S.set_unlock_passphrase, ADMIN, body=DATA)},
    "/config/unattended-boot": {
        "GET": Op(S.get_unattended_boot, ADMIN),
        "PUT": Op(S.set_unattended_boot, ADMIN, body=DATA),
    },
    "/config/tls/public.pem": {"GET": Op(S.tls_public_pem, ADMIN)},
    "/config/tls/cert.pem": {
        "GET": Op(S.tls_cert_pem, ADMIN),
        "PUT": Op(T.set_cert, ADMIN, body=DATA),
    },
    "/config/tls/csr.pem": {"POST": Op(T.make_csr, ADMIN, body=DATA)},
    "/config/tls/generate": {"POST": Op(T.generate, ADMIN, body=DATA)},
    "/config/tls/cluster-ca.pem": {
        "GET": Op(T.get_cluster_ca, ADMIN),
        "PUT": Op(T.set_cluster_ca, ADMIN, body=DATA),
    },
    "/config/time": {"GET": Op(C.get_time, ADMIN), "PUT": Op(C.set_time, ADMIN, body=DATA)},
    "/config/logging": {
        "GET": Op(C.get_logging, ADMIN),
        "PUT": Op(C.set_logging, ADMIN, body=DATA),
    },
    "/config/network": {
        "GET": Op(C.get_network, ADMIN),
        "PUT": Op(C.set_network, ADMIN, body=DATA),
    },
    "/config/backup-passphrase": {"PUT": Op(C.set_backup_passphrase, ADMIN, body=DATA)},
    "/namespaces": {"GET": Op(N.list_namespaces, ADMIN)},
    "/namespaces/{NamespaceID}": {
        "PUT": Op(N.put_namespace, ADMIN),
        "DELETE": Op(N.delete_namespace, ADMIN),
    },
    "/users": {
        "GET": Op(U.list_users, ADMIN, namespaced=True),
        "POST": Op(U.post_users, ADMIN, body=DATA, namespaced=True),
    },
    "/users/{UserID}": {
        "GET": Op(U.get_user, ADMIN_OR_OPERATOR, namespaced=True),
        "PUT": Op(U.put_user, ADMIN, body=DATA, namespaced=True),
        "POST": Op(U.post_user_in_namespace, ADMIN, body=DATA, namespaced=True),
        "DELETE": Op(U.delete_user, ADMIN, namespaced=True),
    },
    "/users/{UserID}/passphrase": {
        "POST": Op(U.set_passphrase, ADMIN_OR_OPERATOR, body=DATA, namespaced=True)
    },
    "/users/{UserID}/tags": {"GET": Op(U.get_tags, ADMIN_OR_OPERATOR, namespaced=True)},
    "/users/{UserID}/tags/{Tag}": {
        "PUT": Op(U.put_tag, ADMIN, namespaced=True),
        "DELETE": Op(U.delete_tag, ADMIN, namespaced=True),
    },
    "/keys": {
        "GET": Op(K.list_keys, ADMIN_OR_OPERATOR, namespaced=True),
        "POST": Op(K.import_post, ADMIN, body=FORM, namespaced=True),
    },
    "/keys/generate": {"POST": Op(K.generate, ADMIN, body=DATA, namespaced=True)},
    "/keys/{KeyPrefix}*": {"GET": Op(K.list_keys_prefix, ADMIN_OR_OPERATOR, namespaced=True)},
    "/keys/{KeyID}": {
        "GET": Op(K.get_key, ADMIN_OR_OPERATOR, namespaced=True),
        "PUT": Op(K.import_put, ADMIN, body=FORM, namespaced=True),
        "DELETE": Op(K.delete_key, ADMIN, namespaced=True),
    },
    "/keys/{KeyID}/label": {
        "PUT": Op(K.set_label, ADMIN, body=DATA, namespaced=True),
        "DELETE": Op(K.delete_label, ADMIN, namespaced=True),
    },
    "/keys/{KeyID}/public.pem": {"GET": Op(K.public_pem, ADMIN_OR_OPERATOR, namespaced=True)},
    "/keys/{KeyID}/csr.pem": {"POST": Op(K.key_csr, ADMIN_OR_OPERATOR, body=DATA, namespaced=True)},
    "/keys/{KeyID}/decrypt": {"POST": Op(K.decrypt, OPERATOR, body=DATA, namespaced=True)},
    "/keys/{KeyID}/encrypt": {"POST": Op(K.encrypt, OPERATOR, body=DATA, namespaced=True)},
    "/keys/{KeyID}/sign": {"POST": Op(K.sign, OPERATOR, body=DATA, namespaced=True)},
    "/keys/{KeyID}/cert": {
        "GET": Op(K.get_cert, ADMIN_OR_OPERATOR, namespaced=True),
        "PUT": Op(K.put_cert, ADMIN, body=DATA, namespaced=True),
        "DELETE": Op(K.delete_cert, ADMIN, namespaced=True),
    },
    "/keys/{KeyID}/move": {"POST": Op(K.move, ADMIN, body=DATA, namespaced=True)},
    "/keys/{KeyID}/restrictions/tags/{Tag}": {
        "PUT": Op(K.put_key_tag, ADMIN, namespaced=True),
        "DELETE": Op(K.delete_key_tag, ADMIN, namespaced=True),
    },
}

#: Spec paths this bridge does not implement: they answer 501 with a JSON message.
NOT_IMPLEMENTED: dict[str, str] = {
    "/health/diagnose": "cluster diagnostics",
    "/cluster/force-new": "clustering",
    "/cluster/join": "clustering",
    "/cluster/members": "clustering",
    "/cluster/members/{MemberID}/promote": "clustering",
    "/cluster/members/{MemberID}": "clustering",
    "/system/update": "system updates",
    "/system/commit-update": "system updates",
    "/system/cancel-update": "system updates",
}
#: Methods of implemented paths that are still not implemented.
NOT_IMPLEMENTED_METHODS: dict[tuple[str, str], str] = {}
ALL_METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH"]


def error_response(exc: ApiError) -> Response:
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)


def dispatch(bridge: Bridge, op: Op, req: Req) -> Response:
    """Form parsing (if the route takes forms) and the handler; every failure a JSON error.

    The state was checked before the body was read; it is checked again here
    because the body may have taken a while (a lock in between wins).
    """
    try:
        bridge.require_state(*op.states)
        if req.user is not None:
            namespaces.check_may_call(bridge.store, req.user.id, op.namespaced)
        content_type = req.headers.get("content-type", "")
        if op.body in (FORM, BACKUP) and forms.is_multipart(content_type):
            binary = forms.BACKUP_FIELDS if op.body == BACKUP else ()
            req.form = forms.parse_multipart(content_type, req.body, bridge.limits, binary)
        return op.handler(bridge, req)
    except ApiError as exc:
        return error_response(exc)
    except HSMError as exc:
        return error_response(from_hsm_error(exc))
    except Exception:
        log.exception("unexpected error in %s", op.handler.__name__)
        return error_response(
            ApiError(500, "internal error in hsmbridge serve; the server log has the details")
        )


def _raise_not_implemented(what: str) -> Handler:
    def handler(bridge: Bridge, req: Req) -> Response:
        raise not_implemented(what)

    return handler


@dataclass(frozen=True)
class _Route:
    """One path template: ``{Name}`` matches one non-empty segment, as in Starlette."""

    pattern: re.Pattern[str]
    ops: dict[str, Op]  # method -> operation; HEAD answers as GET


def _compile(path: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", path)  # literal, name, literal, name, ..., literal
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(regex)


def _bucket(path: str) -> tuple[int, str]:
    """Routes that can match a path: same segment count and first segment (always literal)."""
    segments = path.split("/")
    return len(segments), segments[1]


class Router:
    """Method and path (below :data:`PREFIX`) to an operation, Starlette's first-match order."""

    def __init__(self, table: list[tuple[str, dict[str, Op]]]) -> None:
        self._buckets: dict[tuple[int, str], list[_Route]] = {}
        for path, ops in table:
            full = dict(ops)
            if "GET" in full:
                full.setdefault("HEAD", full["GET"])
            route = _Route(_compile(path), full)
            self._buckets.setdefault(_bucket(path), []).append(route)

    def resolve(self, method: str, path: str) -> tuple[Op, dict[str, str]]:
        """The operation and path parameters; ApiError 404 or 405 if there is none."""
        allowed: set[str] = set()
        if path.startswith(PREFIX):
            sub = path[len(PREFIX) :]
            for route in self._buckets.get(_bucket(sub), ()) if sub.startswith("/") else ():
                match = route.pattern.fullmatch(sub)
                if match is None:
                    continue
                op = route.ops.get(method)
                if op is not None:
                    return op, match.groupdict()
                allowed.update(route.ops)
        if allowed:
            raise ApiError(
                405, "method not allowed on this endpoint", {"Allow": ", ".join(sorted(allowed))}
            )
        raise ApiError(404, "no such endpoint")


def route_table() -> list[tuple[str, dict[str, Op]]]:
    """:data:`ROUTES` with the not-implemented paths and methods, in matching order."""
    table = []
    for path, methods in ROUTES.items():
        ops = dict(methods)
        for (p, method), what in NOT_IMPLEMENTED_METHODS.items():
            if p == path:
                ops[method] = Op(_raise_not_implemented(what), None, ANY_STATE)
        table.append((path, ops))
    for path, what in NOT_IMPLEMENTED.items():
        op = Op(_raise_not_implemented(what), None, ANY_STATE)
        table.append((path, dict.fromkeys(ALL_METHODS, op)))
    return table


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() != "0")


async def _read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The whole body, whatever its content type: 413 beyond ``limit``.

    A body that stops arriving is cut off by the connection's body deadline
    (:mod:`hsmbridge.server.connections`), which then reads as a disconnect.
    """
    too_large = ApiError(413, f"the request body is larger than {limit} bytes")
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _base_url(scope: Scope) -> str:
    """What Starlette's ``request.base_url`` gives, plus :data:`PREFIX`."""
    root = scope.get("root_path", "")
    base = URL(scope={**scope, "path": root.rstrip("/") + "/", "query_string": b""})
    return str(base).rstrip("/") + PREFIX


def _query(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


#: distinct base URLs remembered (see BridgeApp._base_url)
MAX_BASE_URLS = 16


class BridgeApp:
    """The ASGI app: lifespan (operation-count flushing) and the API's HTTP requests."""

    def __init__(self, bridge: Bridge, threads: int, flush_interval: float) -> None:
        self.bridge = bridge
        self.router = Router(route_table())
        self.threads = threads
        self.flush_interval = flush_interval
        self.limits = bridge.limits
        #: requests admitted and not yet answered (read on the event loop only)
        self.requests = 0
        self._workers: Workers | None = None
        #: base URLs by (scheme, server, root path, Host header); a few entries at most
        self._base_urls: dict[tuple[Any, ...], str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        assert self._workers is not None, "the app serves requests only inside its lifespan"
        return await self._workers.run(func, *args)

    def _base_url(self, scope: Scope, headers: Headers) -> str:
        """:func:`_base_url`, remembered for the few (scheme, server, Host) a server sees."""
        key = (scope["scheme"], scope.get("server"), scope.get("root_path"), headers.get("host"))
        url = self._base_urls.get(key)
        if url is None:
            url = _base_url(scope)
            if len(self._base_urls) < MAX_BASE_URLS:  # Host is the client's to choose
                self._base_urls[key] = url
        return url

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = Headers(scope=scope)
        unread = [_has_body(headers)]  # a body left unread: close the connection after
        if self.requests >= self.limits.max_requests:
            response = error_response(
                ApiError(
                    503, "the server is at its request limit; retry shortly", {"Retry-After": "1"}
                )
            )
        else:
            self.requests += 1
            try:
                response = await self._respond(scope, receive, headers, unread)
            except ClientGone:
                return
            except Exception:
                log.exception("unhandled error")
                response = JSONResponse(
                    {"message": "internal error in hsmbridge serve"}, status_code=500
                )
            finally:
                self.requests -= 1
        if unread[0]:
            response.headers["connection"] = "close"
        self.bridge.http_metrics.record(response.status_code, time.perf_counter() - started)
        await response(scope, receive, send)

    async def _respond(
        self, scope: Scope, receive: Receive, headers: Headers, unread: list[bool]
    ) -> Response:
        method: str = scope["method"]
        client = scope.get("client")
        who = client_key(client[0] if client else None)
        try:
            op, params = self.router.resolve(method, scope["path"])
            self.bridge.require_state(*op.states)
            roles = op.roles_in(self.bridge.state)
            user = await self._authenticate(roles, headers, who)
            if user is not None:
                namespaces.check_route(user.id, op.namespaced)
            body = b""
            if op.body != NO_BODY:
                body = await _read_body(receive, headers, self._body_limit(op, roles))
                unread[0] = False
        except ApiError as exc:
            return error_response(exc)
        req = Req(
            method=method,
            path=params,
            query=_query(scope["query_string"]),
            headers=headers,
            body=body,
            client=who,
            base_url=self._base_url(scope, headers),
            user=user,
        )
        response: Response = await self._in_thread(dispatch, self.bridge, op, req)
        return response

    def _body_limit(self, op: Op, roles: tuple[str, ...] | None) -> int:
        if op.body == BACKUP:
            return self.limits.max_backup_body
        return self.limits.max_body if roles else self.limits.max_public_body

    async def _authenticate(
        self, roles: tuple[str, ...] | None, headers: Headers, client: str
    ) -> UserRecord | None:
        """The caller: credentials verified before on the loop, others (argon2) in a thread."""
        if roles is None:
            return None
        authorization = headers.get("authorization")
        user = self.bridge.cached_login(authorization, roles)
        if user is None:
            user = await self._in_thread(self.bridge.authenticate, authorization, client, roles)
        return user

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        flusher: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._workers = Workers(self.threads, "hsmbridge-req")
                flusher = asyncio.create_task(self._flush_periodically())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if flusher is not None:
                    flusher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await flusher
                with contextlib.suppress(Exception):
                    await self._in_thread(self.bridge.store.flush_operations)
                if self._workers is not None:
                    self._workers.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self._in_thread(self.bridge.maintain)
            except Exception:
                log.exception("writing operation counts or the heartbeat failed; retrying later")


def build_app(bridge: Bridge, threads: int = 64, flush_interval: float = 2.0) -> BridgeApp:
    """The ASGI app for ``bridge`` (limits from ``bridge.limits``); ``threads`` bounds
    concurrent blocking work."""
    api_config.apply_log_level(bridge)  # the stored level holds from the start
    return BridgeApp(bridge, threads, flush_interval)
