"""The one table of elliptic curves hsmbridge knows.

Every module that needs a curve fact (the name users type, the OID a token
stores in CKA_EC_PARAMS, the ``cryptography`` curve, the NetHSM key type, the
JWK ``crv``, the hash a CSR signs with) reads it from :data:`CURVES`, so adding
a curve means adding one row here.
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
    #: hash that matches the curve's strength (CSRs, certificates)
    hash_name: str
    _crypto: Callable[[], EllipticCurve]

    @property
    def field_bytes(self) -> int:
        """Bytes of one coordinate (and of r and s in a raw ECDSA signature)."""
        return (self.bits + 7) // 8

    def crypto_curve(self) -> EllipticCurve:
        """The ``cryptography`` curve object."""
        return self._crypto()


def _secp(name: str) -> Callable[[], EllipticCurve]:
    def make() -> EllipticCurve:
        from cryptography.hazmat.primitives.asymmetric import ec

        return getattr(ec, name.upper())()  # type: ignore[no-any-return]

    return make


CURVES: tuple[Curve, ...] = (
    Curve("P-256", ("P256", "SECP256R1", "PRIME256V1"), "secp256r1", 256, "EC_P256", "sha256",
          _secp("secp256r1")),
    Curve("P-384", ("P384", "SECP384R1"), "secp384r1", 384, "EC_P384", "sha384",
          _secp("secp384r1")),
    Curve("P-521", ("P521", "SECP521R1"), "secp521r1", 521, "EC_P521", "sha512",
          _secp("secp521r1")),
)  # fmt: skip

_BY_NAME = {spelling: c for c in CURVES for spelling in (c.name, *c.aliases)}
_BY_OID_NAME = {c.oid_name: c for c in CURVES}
_BY_NETHSM_TYPE = {c.nethsm_type: c for c in CURVES}

#: "P-256, P-384 or P-521", for messages
NAMES = ", ".join(c.name for c in CURVES[:-1]) + f" or {CURVES[-1].name}"


def by_name(name: str) -> Curve | None:
    """The curve a user named (any spelling, any case), or None."""
    return _BY_NAME.get(str(name).upper())


def by_oid_name(oid_name: str) -> Curve | None:
    """The curve of a named-curve OID (``secp256r1``; ``cryptography``'s ``curve.name``)."""
    return _BY_OID_NAME.get(oid_name)


def by_nethsm_type(key_type: str) -> Curve | None:
    """The curve of a NetHSM key type (``EC_P256``), or None."""
    return _BY_NETHSM_TYPE.get(key_type)


def get(name: str) -> Curve:
    """The curve with this canonical name (an ``EC`` spec's ``curve``); KeyError if none."""
    return _BY_NAME[name]
