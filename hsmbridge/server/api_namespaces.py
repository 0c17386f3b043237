"""Namespace endpoints: list, create, delete (root Administrators only, see .namespaces)."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response

from .bridge import Bridge, Req, check_id
from .errors import ApiError, not_found


def list_namespaces(b: Bridge, req: Req) -> Response:
    return JSONResponse([{"id": ns} for ns in b.store.list_namespaces()])


def put_namespace(b: Bridge, req: Req) -> Response:
    namespace = check_id(req.path["NamespaceID"], "NamespaceID")
    if not b.store.add_namespace(namespace):
        raise ApiError(409, f"namespace {namespace} already exists")
    return Response(status_code=204)


def delete_namespace(b: Bridge, req: Req) -> Response:
    """Delete the namespace and all its keys; its users stay (root administrators remove them)."""
    namespace = check_id(req.path["NamespaceID"], "NamespaceID")
    if not b.store.namespace_exists(namespace):
        raise not_found(f"namespace {namespace}")
    b.delete_namespace(namespace)
    return Response(status_code=204)
