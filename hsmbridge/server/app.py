"""The ASGI application: NetHSM REST API v1 routes over a :class:`Bridge`.

Each route names its handler, the roles allowed to call it and the states it
works in. One async endpoint reads the request, then runs state check,
authentication and the handler in a worker thread (HSM calls and argon2 block),
and turns every error into NetHSM's ``{"message": ...}`` body in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import HSMError
from . import api_keys, api_system, api_users
from .bridge import LOCKED, OPERATIONAL, UNPROVISIONED, Bridge, Req
from .errors import ApiError, from_hsm_error, not_implemented

log = logging.getLogger("hsmbridge.server")

PREFIX = "/api/v1"
MAX_BODY = 2 * 1024 * 1024
ANY_STATE = (UNPROVISIONED, LOCKED, OPERATIONAL)
ADMIN = ("Administrator",)
OPERATOR = ("Operator",)
ADMIN_OR_OPERATOR = ("Administrator", "Operator")

Handler = Callable[[Bridge, Req], Response]


@dataclass(frozen=True)
class Op:
    handler: Handler
    roles: tuple[str, ...] | None  # None: public, no authentication
    states: tuple[str, ...] = (OPERATIONAL,)


S, U, K = api_system, api_users, api_keys

#: path -> method -> operation. Order matters: ``/keys/{KeyPrefix}*`` before ``/keys/{KeyID}``.
ROUTES: dict[str, dict[str, Op]] = {
    "/info": {"GET": Op(S.info, None, ANY_STATE)},
    "/health/alive": {"GET": Op(S.health_alive, None, ANY_STATE)},
    "/health/ready": {"GET": Op(S.health_ready, None, ANY_STATE)},
    "/health/state": {"GET": Op(S.health_state, None, ANY_STATE)},
    "/provision": {"POST": Op(S.provision, None, (UNPROVISIONED,))},
    "/unlock": {"POST": Op(S.unlock, None, (LOCKED,))},
    "/lock": {"POST": Op(S.lock, ADMIN)},
    "/random": {"POST": Op(S.random, OPERATOR)},
    "/metrics": {"GET": Op(S.metrics, ("Metrics",))},
    "/system/info": {"GET": Op(S.system_info, ADMIN)},
    "/config/unlock-passphrase": {"PUT": Op(S.set_unlock_passphrase, ADMIN)},
    "/config/unattended-boot": {
        "GET": Op(S.get_unattended_boot, ADMIN),
        "PUT": Op(S.set_unattended_boot, ADMIN),
    },
    "/config/tls/public.pem": {"GET": Op(S.tls_public_pem, ADMIN)},
    "/config/tls/cert.pem": {"GET": Op(S.tls_cert_pem, ADMIN)},
    "/config/time": {"GET": Op(S.get_time, ADMIN)},
    "/users": {"GET": Op(U.list_users, ADMIN), "POST": Op(U.post_users, ADMIN)},
    "/users/{UserID}": {
        "GET": Op(U.get_user, ADMIN_OR_OPERATOR),
        "PUT": Op(U.put_user, ADMIN),
        "POST": Op(U.post_user_in_namespace, ADMIN),
        "DELETE": Op(U.delete_user, ADMIN),
    },
    "/users/{UserID}/passphrase": {"POST": Op(U.set_passphrase, ADMIN_OR_OPERATOR)},
    "/users/{UserID}/tags": {"GET": Op(U.get_tags, ADMIN_OR_OPERATOR)},
    "/users/{UserID}/tags/{Tag}": {
        "PUT": Op(U.put_tag, ADMIN),
        "DELETE": Op(U.delete_tag, ADMIN),
    },
    "/keys": {"GET": Op(K.list_keys, ADMIN_OR_OPERATOR), "POST": Op(K.import_post, ADMIN)},
    "/keys/generate": {"POST": Op(K.generate, ADMIN)},
    "/keys/{KeyPrefix}*": {"GET": Op(K.list_keys_prefix, ADMIN_OR_OPERATOR)},
    "/keys/{KeyID}": {
        "GET": Op(K.get_key, ADMIN_OR_OPERATOR),
        "PUT": Op(K.import_put, ADMIN),
        "DELETE": Op(K.delete_key, ADMIN),
    },
    "/keys/{KeyID}/label": {"PUT": Op(K.set_label, ADMIN), "DELETE": Op(K.delete_label, ADMIN)},
    "/keys/{KeyID}/public.pem": {"GET": Op(K.public_pem, ADMIN_OR_OPERATOR)},
    "/keys/{KeyID}/csr.pem": {"POST": Op(K.key_csr, ADMIN_OR_OPERATOR)},
    "/keys/{KeyID}/decrypt": {"POST": Op(K.decrypt, OPERATOR)},
    "/keys/{KeyID}/encrypt": {"POST": Op(K.encrypt, OPERATOR)},
    "/keys/{KeyID}/sign": {"POST": Op(K.sign, OPERATOR)},
    "/keys/{KeyID}/cert": {
        "GET": Op(K.get_cert, ADMIN_OR_OPERATOR),
        "PUT": Op(K.put_cert, ADMIN),
        "DELETE": Op(K.delete_cert, ADMIN),
    },
    "/keys/{KeyID}/move": {"POST": Op(K.move, ADMIN)},
    "/keys/{KeyID}/restrictions/tags/{Tag}": {
        "PUT": Op(K.put_key_tag, ADMIN),
        "DELETE": Op(K.delete_key_tag, ADMIN),
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
    "/namespaces": "namespaces",
    "/namespaces/{NamespaceID}": "namespaces",
    "/config/tls/csr.pem": "TLS certificate management",
    "/config/tls/generate": "TLS certificate management",
    "/config/tls/cluster-ca.pem": "TLS certificate management",
    "/config/network": "network configuration",
    "/config/logging": "logging configuration",
    "/config/backup-passphrase": "backup",
    "/system/reboot": "system control",
    "/system/shutdown": "system control",
    "/system/factory-reset": "system control",
    "/system/update": "system updates",
    "/system/commit-update": "system updates",
    "/system/cancel-update": "system updates",
    "/system/backup": "backup",
    "/system/restore": "backup and restore",
}
#: Methods of implemented paths that are still not implemented.
NOT_IMPLEMENTED_METHODS = {
    ("/config/tls/cert.pem", "PUT"): "TLS certificate management",
    ("/config/time", "PUT"): "setting the system time",
}
ALL_METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH"]


def error_response(exc: ApiError) -> Response:
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)


def dispatch(bridge: Bridge, op: Op, req: Req) -> Response:
    """State check, authentication, handler; every failure becomes a JSON error."""
    try:
        bridge.require_state(*op.states)
        if op.roles is not None:
            req.user = bridge.authenticate(req, op.roles)
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


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read(request: Request) -> tuple[bytes, dict[str, str | bytes] | None]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form: dict[str, str | bytes] = {}
        async with request.form(max_files=2, max_fields=8) as data:
            for name, value in data.items():
                form[name] = value if isinstance(value, str) else await value.read()
        return b"", form
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    return body, None


def _endpoint(bridge: Bridge, methods: dict[str, Op]) -> Callable[[Request], object]:
    async def endpoint(request: Request) -> Response:
        op = methods[request.method]
        try:
            body, form = await _read(request)
        except ApiError as exc:
            return error_response(exc)
        except Exception as exc:  # malformed multipart and the like
            return error_response(ApiError(400, f"cannot read the request body: {exc}"))
        req = Req(
            method=request.method,
            path=dict(request.path_params),
            query=dict(request.query_params),
            headers=request.headers,
            body=body,
            client=_client(request),
            base_url=str(request.base_url).rstrip("/") + PREFIX,
            form=form,
        )
        return await run_in_threadpool(dispatch, bridge, op, req)

    return endpoint


def _unimplemented(what: str) -> Callable[[Request], object]:
    async def endpoint(request: Request) -> Response:
        return error_response(not_implemented(what))

    return endpoint


def build_app(bridge: Bridge, threads: int = 64, flush_interval: float = 2.0) -> Starlette:
    """The Starlette app for ``bridge``; ``threads`` bounds concurrent blocking work."""
    routes = []
    for path, methods in ROUTES.items():
        extra = {m: w for (p, m), w in NOT_IMPLEMENTED_METHODS.items() if p == path}
        ops: dict[str, Op] = dict(methods)
        for method, what in extra.items():
            ops[method] = Op(_raise_not_implemented(what), None, ANY_STATE)
        routes.append(Route(PREFIX + path, _endpoint(bridge, ops), methods=list(ops)))
    for path, what in NOT_IMPLEMENTED.items():
        routes.append(Route(PREFIX + path, _unimplemented(what), methods=ALL_METHODS))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads

        async def flush() -> None:
            while True:
                await asyncio.sleep(flush_interval)
                await run_in_threadpool(bridge.store.flush_operations)

        task = asyncio.create_task(flush())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await run_in_threadpool(bridge.store.flush_operations)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail)
        )
        return JSONResponse({"message": message}, status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({"message": "internal error in hsmbridge serve"}, status_code=500)

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def _raise_not_implemented(what: str) -> Handler:
    def handler(bridge: Bridge, req: Req) -> Response:
        raise not_implemented(what)

    return handler
