"""Key endpoints: list, generate, import, get, delete, label, move, tags, cert, crypto."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cryptography import x509
from starlette.responses import JSONResponse, Response

from ..api import AES_BITS, AES_BLOCK, Key, SecretKey
from ..nethsm import vocabulary
from . import csr, importer, keys, namespaces
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


def _ns(req: Req) -> str:
    """The caller's namespace: keys are made, listed and used within it."""
    return namespaces.namespace_of(req.user.id) if req.user is not None else ""


def _list(b: Bridge, req: Req, prefix: str = "") -> Response:
    label = req.query.get("label")
    filtered = "filter" in req.query
    ns = _ns(req)
    out = [
        {"id": namespaces.local_id(rec.id)}
        for rec in b.store.list_keys()
        if namespaces.namespace_of(rec.id) == ns
        and namespaces.local_id(rec.id).startswith(prefix)
        and (label is None or rec.label == label)
        and (not filtered or b.usable_by(req.user, rec))
    ]
    return JSONResponse(out)


def list_keys(b: Bridge, req: Req) -> Response:
    return _list(b, req)


def list_keys_prefix(b: Bridge, req: Req) -> Response:
    return _list(b, req, check_id(req.path["KeyPrefix"], "KeyPrefix"))


def get_key(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    body: dict[str, Any] = {
        "mechanisms": rec.mechanisms,
        "type": rec.type,
        "restrictions": {"tags": rec.tags} if rec.tags else {},
        "operations": rec.operations,
        "label": rec.label,
    }
    if rec.type == vocabulary.GENERIC:
        b.secret_key(rec)  # 404 if the token lost it; a Generic key has no public part
    else:
        body["public"] = vocabulary.public_data(b.backend_key(rec).public_key_der())
    return JSONResponse(body)


def _key_pair(b: Bridge, rec: KeyRecord) -> Key:
    """The backend key pair of an RSA/EC key (400 for a Generic key, which has no pair)."""
    if rec.type == vocabulary.GENERIC:
        raise bad_request(f"key {rec.id} is a Generic (AES) key: it has no public key to do this")
    return b.backend_key(rec)


def public_pem(b: Bridge, req: Req) -> Response:
    key = _key_pair(b, b.key_record(req.path["KeyID"], _ns(req)))
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


def _create(b: Bridge, rec: KeyRecord, make: Callable[[str], Key | SecretKey]) -> None:
    """Create the backend key with ``make(backend_label)`` and register it two-phase."""
    if not b.create_key(rec, make):
        raise ApiError(409, f"a key with the ID {namespaces.local_id(rec.id)} already exists")


def _new_record(
    req: Req, key_id: str, key_type: str, mechanisms: list[str], body: dict[str, Any]
) -> KeyRecord:
    internal_id = namespaces.scoped(_ns(req), key_id)
    return KeyRecord(
        id=internal_id,
        type=key_type,
        mechanisms=tuple(mechanisms),
        backend_id=os.urandom(16).hex(),
        backend_label=internal_id,
        label=_label(body.get("label")),
        tags=tuple(_restrictions(body.get("restrictions"))),
        status="pending",
    )


def _created(req: Req, key_id: str) -> Response:
    return JSONResponse(
        {"id": key_id}, status_code=201, headers={"Location": f"{req.base_url}/keys/{key_id}"}
    )


def _check_performable(b: Bridge, key_type: str, mechanisms: list[str]) -> None:
    """400 for a key mechanism the token cannot perform, naming those it can: refused
    when the key is made, not accepted and then refused at every use."""
    offered = b.hsm.supported_mechanisms()
    if offered is None:  # the backend learns on first use
        return
    works = vocabulary.performable(key_type, offered)
    missing = [m for m in mechanisms if m not in works]
    if missing:
        raise bad_request(
            vocabulary.unperformable_message(b.hsm.description, key_type, missing, works)
        )


def generate(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mechanisms", "type"}, _GENERATE_FIELDS)
    key_type = body["type"]
    if not isinstance(key_type, str) or key_type not in vocabulary.ALL_TYPES:
        raise bad_request(f"unknown key type {key_type!r}")
    length = body.get("length")
    make: Callable[[str], Key | SecretKey]
    if key_type == vocabulary.GENERIC:
        if length not in AES_BITS or isinstance(length, bool):
            raise bad_request(f"Generic keys are AES keys of {', '.join(map(str, AES_BITS))} bits")
        mechanisms = vocabulary.check_mechanisms(key_type, body["mechanisms"])

        def make(label: str) -> Key | SecretKey:
            return b.hsm.generate_secret_key(length, label, key_id=rec.backend_id)
    else:
        spec = vocabulary.spec_for(key_type, length)
        mechanisms = vocabulary.check_mechanisms(key_type, body["mechanisms"])
        _check_performable(b, key_type, mechanisms)
        usage = vocabulary.usage_of(mechanisms)

        def make(label: str) -> Key | SecretKey:
            return b.hsm.generate_key(spec, label, usage=usage, key_id=rec.backend_id)

    key_id = body.get("id")
    key_id = secrets.token_hex(10) if key_id in (None, "") else check_id(str(key_id))
    rec = _new_record(req, key_id, key_type, mechanisms, body)
    _create(b, rec, make)
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
    _check_performable(b, key_type, mechanisms)
    rec = _new_record(req, key_id, key_type, mechanisms, args)
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
    if b.store.get_key(namespaces.scoped(_ns(req), key_id)) is not None:
        raise ApiError(409, f"a key with the ID {key_id} already exists")
    _import(b, req, key_id)
    return Response(status_code=204)


# -- changing -----------------------------------------------------------------------


def delete_key(b: Bridge, req: Req) -> Response:
    b.delete_key(b.key_record(req.path["KeyID"], _ns(req)))
    return Response(status_code=204)


def set_label(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    label = _label(req.json_object({"label"})["label"])
    if label == rec.label:
        return Response(status_code=304)
    b.store.save_key(replace(rec, label=label))
    return Response(status_code=204)


def delete_label(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    if rec.label:
        b.store.save_key(replace(rec, label=""))
    return Response(status_code=204)


def move(b: Bridge, req: Req) -> Response:
    old_id = req.path["KeyID"]
    new_id = req.json_object({"newId"})["newId"]
    if not isinstance(new_id, str):
        raise bad_request("newId must be a string")
    check_id(new_id, "newId")
    old = b.key_record(old_id, _ns(req))
    try:
        moved = b.store.move_key(
            old.id, namespaces.scoped(_ns(req), new_id)
        )  # uses not yet written follow the backend id
    except KeyError:
        raise not_found(f"key {old_id}") from None
    if not moved:
        raise ApiError(409, f"a key with the ID {new_id} already exists")
    return JSONResponse({"id": new_id})


def put_key_tag(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    tag = check_id(req.path["Tag"], "tag")
    if tag in rec.tags:
        return Response(status_code=304)
    b.store.save_key(replace(rec, tags=tuple(sorted([*rec.tags, tag]))))
    return Response(status_code=204)


def delete_key_tag(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    tag = req.path["Tag"]
    if tag not in rec.tags:
        raise not_found(f"tag {tag} of key {rec.id}")
    b.store.save_key(replace(rec, tags=tuple(t for t in rec.tags if t != tag)))
    return Response(status_code=204)


# -- certificates -------------------------------------------------------------------


def get_cert(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
    if rec.cert is None:
        raise not_found(f"certificate of key {rec.id}")
    return Response(rec.cert, media_type="application/octet-stream")


def put_cert(b: Bridge, req: Req) -> Response:
    rec = b.key_record(req.path["KeyID"], _ns(req))
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
    rec = b.key_record(req.path["KeyID"], _ns(req))
    if rec.cert is None:
        raise not_found(f"certificate of key {rec.id}")
    b.store.save_key(replace(rec, cert=None, cert_type=None))
    return Response(status_code=204)


# -- cryptography -------------------------------------------------------------------


def _usable_record(b: Bridge, req: Req) -> KeyRecord:
    """The key's shared cached record (read only), once the caller may use it."""
    rec = b.key_for_use(req.path["KeyID"], _ns(req))
    b.check_tags(req.user, rec)
    return rec


def _usable(b: Bridge, req: Req) -> tuple[KeyRecord, Key]:
    """The key's shared cached record (read only) and its backend key pair, for crypto."""
    rec = _usable_record(b, req)
    return rec, _key_pair(b, rec)


def _aes(b: Bridge, rec: KeyRecord, mode: object, mechanism: str) -> SecretKey:
    """The AES key of a Generic key allowed ``mechanism`` (400 otherwise)."""
    if mode != "AES_CBC":
        raise bad_request(f"Generic keys encrypt and decrypt in mode AES_CBC, not {mode!r}")
    if mechanism not in rec.mechanisms:
        raise bad_request(
            f"key {rec.id} does not allow {mechanism}: its mechanisms are "
            f"{', '.join(rec.mechanisms)}"
        )
    return b.secret_key(rec)


def _base64_answer(member: bytes, data: bytes) -> Response:
    """``{"<member>":"<base64>"}``: base64 needs no JSON escaping, so no encoder runs."""
    body = b'{"%s":"%s"}' % (member, base64.b64encode(data))
    return Response(body, media_type="application/json")


def sign(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mode", "message"})
    rec, key = _usable(b, req)
    message = keys.unb64(body["message"], "message")
    signature = keys.sign(key, rec.id, list(rec.mechanisms), str(body["mode"]), message)
    b.store.count_operation(rec)
    return _base64_answer(b"signature", signature)


def decrypt(b: Bridge, req: Req) -> Response:
    body = req.json_object({"mode", "encrypted"}, {"iv"})
    rec = _usable_record(b, req)
    if rec.type == vocabulary.GENERIC:
        aes = _aes(b, rec, body["mode"], "AES_Decryption_CBC")
        iv = keys.unb64(body.get("iv"), "iv")
        plain = aes.decrypt_cbc(keys.unb64(body["encrypted"], "encrypted"), iv)
        b.store.count_operation(rec)
        return _base64_answer(b"decrypted", plain)
    key = _key_pair(b, rec)
    data = keys.unb64(body["encrypted"], "encrypted")
    plaintext = keys.decrypt(key, rec.id, list(rec.mechanisms), str(body["mode"]), data)
    b.store.count_operation(rec)
    return _base64_answer(b"decrypted", plaintext)


def encrypt(b: Bridge, req: Req) -> Response:
    """AES-CBC with a Generic key (a random IV unless one is sent); RSA/EC keys answer 400."""
    body = req.json_object({"mode", "message"}, {"iv"})
    rec = _usable_record(b, req)
    if rec.type != vocabulary.GENERIC:
        raise keys.check_encrypt(_key_pair(b, rec), body["mode"])
    aes = _aes(b, rec, body["mode"], "AES_Encryption_CBC")
    iv = os.urandom(AES_BLOCK) if body.get("iv") is None else keys.unb64(body["iv"], "iv")
    encrypted = aes.encrypt_cbc(keys.unb64(body["message"], "message"), iv)
    b.store.count_operation(rec)
    return JSONResponse({"encrypted": keys.b64(encrypted), "iv": keys.b64(iv)})


def key_csr(b: Bridge, req: Req) -> Response:
    body = csr.check_dn(req.json_object({"commonName"}, set(csr.DN_FIELDS) | {"subjectAltNames"}))
    _, key = _usable(b, req)
    return Response(csr.build_csr(key, body), media_type="application/x-pem-file")
