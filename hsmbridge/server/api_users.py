"""User endpoints: list, create, get, delete, passphrase, operator tags."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from starlette.responses import JSONResponse, Response

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
    """The user named in the path, which operators may only be themselves.

    The role is checked before the lookup: an operator gets 403 for every other
    user ID, existing or not, so it cannot learn which user names exist.
    """
    assert req.user is not None
    user_id = check_user_id(req.path["UserID"])
    if req.user.role != "Administrator" and req.user.id != user_id:
        raise ApiError(403, "access denied: operators may only access their own user")
    return _user_or_404(b, user_id)


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
    return JSONResponse([{"user": u} for u in b.store.list_users()])


def post_users(b: Bridge, req: Req) -> Response:
    user_id = secrets.token_hex(10)
    _create(b, req, user_id)
    return JSONResponse(
        {"id": user_id}, status_code=201, headers={"Location": f"{req.base_url}/users/{user_id}"}
    )


def get_user(b: Bridge, req: Req) -> Response:
    user = _own_or_any(b, req)
    return JSONResponse({"realName": user.real_name, "role": user.role})


def put_user(b: Bridge, req: Req) -> Response:
    user_id = check_user_id(req.path["UserID"])
    _create(b, req, user_id)
    return Response(status_code=201, headers={"Location": f"{req.base_url}/users/{user_id}"})


def post_user_in_namespace(b: Bridge, req: Req) -> Response:
    raise bad_request("namespaced users (namespace~) are not implemented by hsmbridge serve")


def delete_user(b: Bridge, req: Req) -> Response:
    user = _user_or_404(b, req.path["UserID"])
    assert req.user is not None
    if user.id == req.user.id:
        raise bad_request("you cannot delete yourself; ask another administrator")
    b.store.delete_user(user.id)
    return Response(status_code=204)


def set_passphrase(b: Bridge, req: Req) -> Response:
    user = _own_or_any(b, req)
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
    user = _user_or_404(b, req.path["UserID"])
    tag = check_id(req.path["Tag"], "tag")
    if user.role != "Operator":
        raise bad_request(f"tags can only be given to Operator users; {user.id} is {user.role}")
    if tag in user.tags:
        return Response(status_code=304)
    _set_tags(b, user, [*user.tags, tag])
    return Response(status_code=204)


def delete_tag(b: Bridge, req: Req) -> Response:
    user = _user_or_404(b, req.path["UserID"])
    tag = req.path["Tag"]
    if tag not in user.tags:
        raise not_found(f"tag {tag} of user {user.id}")
    _set_tags(b, user, [t for t in user.tags if t != tag])
    return Response(status_code=204)
