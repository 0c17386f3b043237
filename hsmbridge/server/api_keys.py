"""Key endpoints: list, generate, import, get, delete, label, move, tags, cert, crypto."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cryptography import x509
from starlette.responses import JSONResponse, Response

from ..api import Key
from ..nethsm import vocabulary
from . import csr, importer, keys
from .bridge import Bridge, Req, check_id, parse_json
from .errors import ApiError, bad_request, not_found
from .state import KeyRecord

MAX_CERT = 1024 * 1024
CERT_TYPES = {
    "application/octet-stream",
    "application/x-pem-file",
    "application/x-x509-ca-cert",
    "application/pkix-cert",
}
_GENERATE_FIELDS = {"mechanisms", "type", "length", "id", "restrictions", "label"}
_IMPORT_FIELDS = {"mechanisms", "type", "private", "restrictions", "label"}


# -- listing and reading ------------------------------------------------------------


def _list(b: Bridge, req: Req, prefix: str = "") -> Response:
    label = req.query.get("label")
    filtered = "filter" in req.query
    out = [
        {"id": rec.id}
        for rec in b.store.list_keys()
        if rec.id.startswith(prefix)
        and (label is None or rec.label == label)
        and (not filtered or b.usable_by(req.user, rec))
    ]
    return JSONResponse(out)


def list_keys(b: Bridge, req: Req) -> Response:
    return _list(b, req)


def list_keys_prefix(b: Bridge, req: Req) -> Response:
    return _list(b, req, check_id(req.path["KeyPrefix"], "KeyPrefix"))


def get_key(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    key = b.backend_key(rec)
    body: dict[str, Any] = {
        "mechanisms": rec.mechanisms,
        "type": rec.type,
        "restrictions": {"tags": rec.tags} if rec.tags else {},
        "public": vocabulary.public_data(key.public_key_der()),
        "operations": rec.operations,
        "label": rec.label,
    }
    return JSONResponse(body)


def public_pem(b: Bridge, req: Req) -> Response:
    key = b.backend_key(b.key_record(req.path["KeyID"]))
    return Response(key.public_key_pem(), media_type="application/x-pem-file")


# -- creating -----------------------------------------------------------------------


def _restrictions(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict) or set(value) - {"tags"}:
        raise bad_request("restrictions must be an object with only 'tags'")
    tags = value.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise bad_request("restrictions.tags must be a list of strings")
    return sorted({check_id(t, "tag") for t in tags})


def _label(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value.encode("utf-8")) > 32:
        raise bad_request("label must be a string of at most 32 bytes (UTF-8)")
    return value


def _create(b: Bridge, rec: KeyRecord, make: Callable[[str], Key]) -> None:
    """Create the backend key with ``make(backend_label)`` and register it two-phase."""
    if not b.create_key(rec, make):
        raise ApiError(409, f"a key with the ID {rec.id} already exists")


def _new_record(
    key_id: str, key_type: str, mechanisms: list[str], body: dict[str, Any]
) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        type=key_type,
        mechanisms=tuple(mechanisms),
        backend_id=os.urandom(16).hex(),
        backend_label=key_id,
        label=_label(body.get("label")),
        tags=tuple(_restrictions(body.get("restrictions"))),
        status="pending",
    )


def _created(req: Req, key_id: str) -> Response:
    return JSONResponse(
        {"id": key_id}, status_code=201, headers={"Location": f"{req.base_url}/keys/{key_id}"}
    )


def generate(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mechanisms", "type"}, _GENERATE_FIELDS)
    key_type = body["type"]
    if not isinstance(key_type, str) or key_type not in vocabulary.ALL_TYPES:
        raise bad_request(f"unknown key type {key_type!r}")
    spec = vocabulary.spec_for(key_type, body.get("length"))
    mechanisms = vocabulary.check_mechanisms(key_type, body["mechanisms"])
    key_id = body.get("id")
    key_id = secrets.token_hex(10) if key_id in (None, "") else check_id(str(key_id))
    rec = _new_record(key_id, key_type, mechanisms, body)
    usage = vocabulary.usage_of(mechanisms)

    _create(
        b, rec, lambda label: b.hsm.generate_key(spec, label, usage=usage, key_id=rec.backend_id)
    )
    return _created(req, key_id)


def _import_body(req: Req) -> tuple[str, importer.PrivateKey, list[str], dict[str, Any]]:
    if req.form is not None:
        args = parse_json(req.form.get("arguments", "{}"), "the 'arguments' part")
        if not isinstance(args, dict) or set(args) - {"mechanisms", "restrictions", "label"}:
            raise bad_request("'arguments' may only hold mechanisms, restrictions and label")
        pem = req.form.get("key_file")
        if pem is None:
            raise bad_request("the multipart body needs a 'key_file' part with a PEM private key")
        key_type, private = importer.from_pem(pem if isinstance(pem, bytes) else pem.encode())
        mechanisms = vocabulary.check_mechanisms(key_type, args.get("mechanisms"))
        return key_type, private, mechanisms, args
    body = req.json_object({"mechanisms", "type", "private"}, _IMPORT_FIELDS)
    key_type = body["type"]
    if not isinstance(key_type, str) or key_type not in vocabulary.ALL_TYPES:
        raise bad_request(f"unknown key type {key_type!r}")
    mechanisms = vocabulary.check_mechanisms(key_type, body["mechanisms"])
    return key_type, importer.from_json(key_type, body["private"]), mechanisms, body


def _import(b: Bridge, req: Req, key_id: str) -> None:
    key_type, private, mechanisms, args = _import_body(req)
    rec = _new_record(key_id, key_type, mechanisms, args)
    usage = vocabulary.usage_of(mechanisms)
    _create(
        b,
        rec,
        lambda label: importer.import_key(b.hsm, private, label, rec.backend_id, usage),
    )


def import_post(b: Bridge, req: Req) -> Response:
    key_id = secrets.token_hex(10)
    _import(b, req, key_id)
    return _created(req, key_id)


def import_put(b: Bridge, req: Req) -> Response:
    key_id = check_id(req.path["KeyID"])
    if b.store.get_key(key_id) is not None:
        raise ApiError(409, f"a key with the ID {key_id} already exists")
    _import(b, req, key_id)
    return Response(status_code=204)


# -- changing -----------------------------------------------------------------------


def delete_key(b: Bridge, req: Req) -> Response:
    b.delete_key(b.key_record(req.path["KeyID"]))
    return Response(status_code=204)


def set_label(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    label = _label(req.json_object({"label"})["label"])
    if label == rec.label:
        return Response(status_code=304)
    b.store.save_key(replace(rec, label=label))
    return Response(status_code=204)


def delete_label(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    if rec.label:
        b.store.save_key(replace(rec, label=""))
    return Response(status_code=204)


def move(b: Bridge, req: Req) -> Response:
    old_id = req.path["KeyID"]
    new_id = req.json_object({"newId"})["newId"]
    if not isinstance(new_id, str):
        raise bad_request("newId must be a string")
    check_id(new_id, "newId")
    b.key_record(old_id)
    try:
        moved = b.store.move_key(old_id, new_id)  # uses not yet written follow the backend id
    except KeyError:
        raise not_found(f"key {old_id}") from None
    if not moved:
        raise ApiError(409, f"a key with the ID {new_id} already exists")
    return JSONResponse({"id": new_id})


def put_key_tag(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    tag = check_id(req.path["Tag"], "tag")
    if tag in rec.tags:
        return Response(status_code=304)
    b.store.save_key(replace(rec, tags=tuple(sorted([*rec.tags, tag]))))
    return Response(status_code=204)


def delete_key_tag(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    tag = req.path["Tag"]
    if tag not in rec.tags:
        raise not_found(f"tag {tag} of key {rec.id}")
    b.store.save_key(replace(rec, tags=tuple(t for t in rec.tags if t != tag)))
    return Response(status_code=204)


# -- certificates -------------------------------------------------------------------


def get_cert(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    if rec.cert is None:
        raise not_found(f"certificate of key {rec.id}")
    return Response(rec.cert, media_type="application/octet-stream")


def put_cert(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    media = req.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if media not in CERT_TYPES:
        raise ApiError(415, f"certificates are sent as one of: {', '.join(sorted(CERT_TYPES))}")
    if not req.body or len(req.body) > MAX_CERT:
        raise bad_request("the certificate must be between 1 byte and 1 MB")
    try:
        if req.body.lstrip().startswith(b"-----BEGIN"):
            x509.load_pem_x509_certificate(req.body)
        else:
            x509.load_der_x509_certificate(req.body)
    except ValueError:
        raise bad_request("the body is not an X.509 certificate (PEM or DER)") from None
    if rec.cert is not None:
        raise ApiError(409, f"key {rec.id} already has a certificate; delete it first")
    b.store.save_key(replace(rec, cert=req.body, cert_type=media))
    return Response(status_code=201)


def delete_cert(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"])
    if rec.cert is None:
        raise not_found(f"certificate of key {rec.id}")
    b.store.save_key(replace(rec, cert=None, cert_type=None))
    return Response(status_code=204)


# -- cryptography -------------------------------------------------------------------


def _usable(b: Bridge, req: Req) -> tuple[KeyRecord, Key]:
    """The key's shared cached record (read only) and its backend key, for crypto."""
    rec = b.key_for_use(req.path["KeyID"])
    b.check_tags(req.user, rec)
    return rec, b.backend_key(rec)


def sign(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mode", "message"})
    rec, key = _usable(b, req)
    message = keys.unb64(body["message"], "message")
    signature = keys.sign(key, rec.id, list(rec.mechanisms), str(body["mode"]), message)
    b.store.count_operation(rec)
    return JSONResponse({"signature": keys.b64(signature)})


def decrypt(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mode", "encrypted"}, {"iv"})
    rec, key = _usable(b, req)
    data = keys.unb64(body["encrypted"], "encrypted")
    plaintext = keys.decrypt(key, rec.id, list(rec.mechanisms), str(body["mode"]), data)
    b.store.count_operation(rec)
    return JSONResponse({"decrypted": keys.b64(plaintext)})


def encrypt(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mode", "message"}, {"iv"})
    _, key = _usable(b, req)
    raise keys.check_encrypt(key, body["mode"])


def key_csr(b: Bridge, req: Req) -> Response:
    body = req.json_object({"commonName"}, set(csr.DN_FIELDS) | {"subjectAltNames"})
    for name, value in body.items():
        if name == "subjectAltNames":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad_request("subjectAltNames must be a list of strings")
        elif not isinstance(value, str):
            raise bad_request(f"{name} must be a string")
    _, key = _usable(b, req)
    return Response(csr.build_csr(key, body), media_type="application/x-pem-file")
