"""User endpoints: list, create, get, delete, passphrase, operator tags."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from starlette.responses import JSONResponse, Response

from . import namespaces
from .auth import check_passphrase_strength
from .bridge import ROLES, Bridge, Req, check_id, check_user_id
from .errors import ApiError, bad_request, not_found
from .state import UserRecord

_USER_FIELDS = {"realName", "role", "passphrase"}


def _user_or_404(b: Bridge, user_id: str) -> UserRecord:
    user = b.store.get_user(check_user_id(user_id))
    if user is None:
        raise not_found(f"user {user_id}")
    return user


def _own_or_any(b: Bridge, req: Req) -> UserRecord:
    """The user named in the path: operators may only name themselves, namespace
    administrators only users of their namespace.

    Checked before the lookup: a caller gets 403 for every user ID it may not
    see, existing or not, so it cannot learn which user names exist.
    """
    assert req.user is not None
    user_id = check_user_id(req.path["UserID"])
    if req.user.id != user_id:
        if req.user.role != "Administrator":
            raise ApiError(403, "access denied: operators may only access their own user")
        if not namespaces.can_read_user(req.user.id, user_id):
            raise namespaces.denied(f"user {user_id} is outside your namespace")
    return _user_or_404(b, user_id)


def _managed(b: Bridge, req: Req, user_id: str) -> str:
    """``user_id`` if the calling administrator may create, change or delete it (else 403)."""
    assert req.user is not None
    check_user_id(user_id)
    target_ns = namespaces.namespace_of(user_id)
    exists = bool(target_ns) and b.store.namespace_exists(target_ns)
    namespaces.check_manage_user(req.user.id, user_id, exists)
    return user_id


def _user_body(req: Req) -> dict[str, Any]:
    body = req.json_object(_USER_FIELDS)
    if not isinstance(body["realName"], str):
        raise bad_request("realName must be a string")
    if body["role"] not in ROLES:
        raise bad_request(f"role must be one of {', '.join(ROLES)}")
    check_passphrase_strength(body["passphrase"])
    return body


def _create(b: Bridge, req: Req, user_id: str) -> None:
    body = _user_body(req)
    user = b.new_user(user_id, body["realName"], body["role"], body["passphrase"])
    if not b.store.add_user(user):
        raise ApiError(409, f"a user with the ID {user_id} already exists")


def list_users(b: Bridge, req: Req) -> Response:
    assert req.user is not None
    users = b.store.list_users()
    return JSONResponse([{"user": u} for u in users if namespaces.can_read_user(req.user.id, u)])


def _created(req: Req, user_id: str) -> Response:
    return JSONResponse(
        {"id": user_id}, status_code=201, headers={"Location": f"{req.base_url}/users/{user_id}"}
    )


def post_users(b: Bridge, req: Req) -> Response:
    """A new user with a generated ID, in the caller's namespace."""
    assert req.user is not None
    namespace = namespaces.namespace_of(req.user.id)
    user_id = _managed(b, req, namespaces.scoped(namespace, secrets.token_hex(10)))
    _create(b, req, user_id)
    return _created(req, user_id)


def get_user(b: Bridge, req: Req) -> Response:
    user = _own_or_any(b, req)
    return JSONResponse({"realName": user.real_name, "role": user.role})


def put_user(b: Bridge, req: Req) -> Response:
    user_id = _managed(b, req, req.path["UserID"])
    _create(b, req, user_id)
    return Response(status_code=201, headers={"Location": f"{req.base_url}/users/{user_id}"})


def post_user_in_namespace(b: Bridge, req: Req) -> Response:
    """``POST /users/ns~``: a new user with a generated ID in namespace ``ns``."""
    prefix = req.path["UserID"]
    namespace = prefix[:-1]
    if not prefix.endswith(namespaces.SEPARATOR) or not namespace:
        raise bad_request(
            f"POST /users/{{namespace}}~ creates a user in a namespace, not {prefix!r}"
        )
    check_id(namespace, "namespace")
    user_id = _managed(b, req, namespaces.scoped(namespace, secrets.token_hex(10)))
    _create(b, req, user_id)
    return _created(req, user_id)


def delete_user(b: Bridge, req: Req) -> Response:
    _managed(b, req, req.path["UserID"])
    user = _user_or_404(b, req.path["UserID"])
    assert req.user is not None
    if user.id == req.user.id:
        raise bad_request("you cannot delete yourself; ask another administrator")
    b.store.delete_user(user.id)
    return Response(status_code=204)


def set_passphrase(b: Bridge, req: Req) -> Response:
    user = _own_or_any(b, req)
    assert req.user is not None
    if req.user.id != user.id:
        _managed(b, req, user.id)
    passphrase = check_passphrase_strength(req.json_object({"passphrase"})["passphrase"])
    new_hash = b.passphrases.hash(passphrase)  # cached logins die with the old hash
    b.store.update_user(replace(user, pass_hash=new_hash))
    return Response(status_code=204)


def get_tags(b: Bridge, req: Req) -> Response:
    user = _own_or_any(b, req)
    return JSONResponse(sorted(user.tags))


def _set_tags(b: Bridge, user: UserRecord, tags: list[str]) -> None:
    b.store.update_user(replace(user, tags=tuple(sorted(tags))))


def put_tag(b: Bridge, req: Req) -> Response:
    user = _user_or_404(b, _managed(b, req, req.path["UserID"]))
    tag = check_id(req.path["Tag"], "tag")
    if user.role != "Operator":
        raise bad_request(f"tags can only be given to Operator users; {user.id} is {user.role}")
    if tag in user.tags:
        return Response(status_code=304)
    _set_tags(b, user, [*user.tags, tag])
    return Response(status_code=204)


def delete_tag(b: Bridge, req: Req) -> Response:
    user = _user_or_404(b, _managed(b, req, req.path["UserID"]))
    tag = req.path["Tag"]
    if tag not in user.tags:
        raise not_found(f"tag {tag} of user {user.id}")
    _set_tags(b, user, [t for t in user.tags if t != tag])
    return Response(status_code=204)
