"""The one table of elliptic curves hsmbridge knows.

Every module that needs a curve fact (the name users type, the OID a token
stores in CKA_EC_PARAMS, the ``cryptography`` curve, the NetHSM key type, the
JWK ``kty`` and ``crv``, the hash a CSR signs with) reads it from
:data:`CURVES`, so adding a curve means adding one row here.

Two kinds of curve share the table: Weierstrass curves (``EC(curve)`` specs,
ECDSA, PKCS#11 ``CKK_EC``) and Edwards curves (``Ed25519()``, pure EdDSA,
``CKK_EC_EDWARDS``; docs/design.md, fact 19). The kind decides the spec class,
the PKCS#11 key type and mechanisms, and the JWK form (``EC`` or RFC 8037 ``OKP``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurve


@dataclass(frozen=True)
class Curve:
    """One named curve and its name in every vocabulary hsmbridge speaks."""

    #: the canonical name (``EC("P-256")``), also the JWK ``crv``
    name: str
    #: other spellings users may type (upper case)
    aliases: tuple[str, ...]
    #: the named-curve OID's name in asn1crypto and OpenSSL (``secp256r1``)
    oid_name: str
    bits: int
    #: NetHSM key type
    nethsm_type: str
    #: hash that matches the curve's strength (CSRs, certificates); None: EdDSA hashes itself
    hash_name: str | None
    _crypto: Callable[[], EllipticCurve] | None
    #: the curve OID, dotted (what CKA_EC_PARAMS holds)
    oid: str = ""
    #: ``weierstrass`` (ECDSA) or ``edwards`` (EdDSA)
    kind: str = "weierstrass"

    @property
    def jwk_kty(self) -> str:
        """JWK key type: ``EC`` (RFC 7518) or ``OKP`` (RFC 8037)."""
        return "EC" if self.kind == "weierstrass" else "OKP"

    @property
    def field_bytes(self) -> int:
        """Bytes of one coordinate (and of r and s in a raw ECDSA signature)."""
        return (self.bits + 7) // 8

    def crypto_curve(self) -> EllipticCurve:
        """The ``cryptography`` curve object (Weierstrass curves only)."""
        assert self._crypto is not None, f"{self.name} has no cryptography EllipticCurve"
        return self._crypto()


def _secp(name: str) -> Callable[[], EllipticCurve]:
    def make() -> EllipticCurve:
        from cryptography.hazmat.primitives.asymmetric import ec

        return getattr(ec, name.upper())()  # type: ignore[no-any-return]

    return make


CURVES: tuple[Curve, ...] = (
    Curve("P-256", ("P256", "SECP256R1", "PRIME256V1"), "secp256r1", 256, "EC_P256", "sha256",
          _secp("secp256r1"), "1.2.840.10045.3.1.7"),
    Curve("P-384", ("P384", "SECP384R1"), "secp384r1", 384, "EC_P384", "sha384",
          _secp("secp384r1"), "1.3.132.0.34"),
    Curve("P-521", ("P521", "SECP521R1"), "secp521r1", 521, "EC_P521", "sha512",
          _secp("secp521r1"), "1.3.132.0.35"),
    Curve("Ed25519", ("ED25519", "EDWARDS25519"), "ed25519", 256, "Curve25519", None,
          None, "1.3.101.112", kind="edwards"),
)  # fmt: skip

_BY_NAME = {spelling: c for c in CURVES for spelling in (c.name, *c.aliases)}
_BY_OID_NAME = {name: c for c in CURVES for name in (c.oid_name, c.oid)}
_BY_NETHSM_TYPE = {c.nethsm_type: c for c in CURVES}

#: the curves of ``EC(curve)`` keys (ECDSA)
WEIERSTRASS: tuple[Curve, ...] = tuple(c for c in CURVES if c.kind == "weierstrass")
#: "P-256, P-384 or P-521", for messages about EC keys
NAMES = ", ".join(c.name for c in WEIERSTRASS[:-1]) + f" or {WEIERSTRASS[-1].name}"


def by_name(name: str) -> Curve | None:
    """The curve a user named (any spelling, any case), or None."""
    return _BY_NAME.get(str(name).upper())


def by_oid_name(oid_name: str) -> Curve | None:
    """The curve of a named-curve OID, by name (``secp256r1``; ``cryptography``'s
    ``curve.name``) or dotted (``1.3.101.112``), or None."""
    return _BY_OID_NAME.get(oid_name)


def by_nethsm_type(key_type: str) -> Curve | None:
    """The curve of a NetHSM key type (``EC_P256``), or None."""
    return _BY_NETHSM_TYPE.get(key_type)


def get(name: str) -> Curve:
    """The curve with this canonical name (an ``EC`` spec's ``curve``); KeyError if none."""
    return _BY_NAME[name]
