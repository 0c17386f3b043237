"""TLS management endpoints: a new TLS key, its CSR, its certificate, the cluster CA.

The TLS key is the server's own (a file in the state directory, mode 0600),
not a token key, as on the appliance. A change is served at once: the new
certificate goes into the running server's TLS context, so the next
handshake presents it (connections already open keep theirs), and it is
written to the state directory, so a restart serves it too — unless the
server was started with ``--tls-cert/--tls-key``, which win at start.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from starlette.responses import Response

from .. import curves
from . import csr, tls
from .api_keys import MAX_CERT
from .bridge import Bridge, Req
from .errors import ApiError, bad_request, not_found

RSA_BITS = (2048, 8192)


def _key(b: Bridge) -> tls.TlsPrivateKey:
    if b.control.tls_key is None:
        raise ApiError(404, "this server was started without a TLS key it manages")
    return tls.load_key(b.control.tls_key)


def _serve(b: Bridge, cert_pem: bytes, key: tls.TlsPrivateKey) -> None:
    """Write key and certificate into the state directory and serve them from now on."""
    cert_path, key_path = tls.install(b.state_dir, cert_pem, key)
    b.control.reload_tls(cert_path, key_path)
    b.tls_cert, b.control.tls_key = cert_path, key_path


def generate(b: Bridge, req: Req) -> Response:
    """A new TLS key with a self-signed certificate (as the appliance makes one)."""
    body = req.json_object({"type"}, {"length"})
    key_type, length = body["type"], body.get("length")
    key: tls.TlsPrivateKey
    if key_type == "RSA":
        if not isinstance(length, int) or isinstance(length, bool):
            raise bad_request("an RSA TLS key needs an integer length")
        if not RSA_BITS[0] <= length <= RSA_BITS[1] or length % 8:
            raise bad_request(f"RSA TLS keys are {RSA_BITS[0]}-{RSA_BITS[1]} bits, multiple of 8")
        key = rsa.generate_private_key(65537, length)
    else:
        curve = curves.by_nethsm_type(key_type) if isinstance(key_type, str) else None
        if curve is None:
            offered = ", ".join(["RSA", *(c.nethsm_type for c in curves.CURVES)])
            raise bad_request(f"TLS key type {key_type!r} is not supported; use one of {offered}")
        if length is not None:
            raise bad_request(f"length is for RSA keys; {key_type} has a fixed size")
        key = ec.generate_private_key(curve.crypto_curve())
    _serve(b, tls.self_signed(key), key)
    return Response(status_code=204)


def make_csr(b: Bridge, req: Req) -> Response:
    body = csr.check_dn(req.json_object({"commonName"}, set(csr.DN_FIELDS) | {"subjectAltNames"}))
    key = _key(b)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(key, rsa.RSAPrivateKey):
        pem = csr.signed_csr(
            public,
            body,
            "sha256_rsa",
            lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA256()),
        )
    else:
        pem = csr.signed_csr(
            public, body, "sha256_ecdsa", lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        )
    return Response(pem, media_type="application/x-pem-file")


def _certificates(body: bytes) -> list[x509.Certificate]:
    if not body or len(body) > MAX_CERT:
        raise bad_request("send the certificate as PEM (at most 1 MiB)")
    try:
        certs = x509.load_pem_x509_certificates(body)
    except ValueError:
        raise bad_request("the body is not a PEM certificate (chain)") from None
    return certs


def set_cert(b: Bridge, req: Req) -> Response:
    """The certificate (chain, leaf first) for the current TLS key; served at once."""
    certs = _certificates(req.body)
    key = _key(b)
    if not tls.certifies(certs[0], key):
        raise bad_request(
            "the certificate is not for the server's TLS key: get a CSR from "
            "POST /config/tls/csr.pem and certify that"
        )
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _serve(b, pem, key)
    return Response(status_code=201)


def get_cluster_ca(b: Bridge, req: Req) -> Response:
    pem = b.store.get_setting("cluster_ca")
    if pem is None:
        raise not_found("cluster CA certificate")
    return Response(pem, media_type="application/x-pem-file")


def set_cluster_ca(b: Bridge, req: Req) -> Response:
    """Stored and answered back; the bridge does not cluster, so nothing uses it."""
    certs = _certificates(req.body)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    b.store.set_settings(cluster_ca=pem.decode("ascii"))
    return Response(status_code=201)
