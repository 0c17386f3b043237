"""HSM keys as ``cryptography`` private keys (``key.private_key()``).

The objects here *are* ``cryptography`` private keys — subclasses of
``RSAPrivateKey``, ``EllipticCurvePrivateKey`` and ``Ed25519PrivateKey`` — so code written for keys
in memory takes them unchanged: the X.509 CSR, certificate and CRL builders,
the PKCS#7 signature builder, PyJWT. Their ``sign`` (and RSA ``decrypt``)
translate ``cryptography``'s padding, hash, ``Prehashed`` and ``ECDSA``
objects into an hsmbridge mechanism and run in the HSM through the public
:class:`~hsmbridge.api.Key` API; what has no mechanism is refused with
:class:`~hsmbridge.errors.MechanismNotSupported` naming what works.
``private_numbers()``, ``private_bytes()`` and ``exchange()`` raise
:class:`~hsmbridge.errors.KeyNotExtractable`: the private key never leaves the
HSM, so libraries that read private numbers (to serialise the key, or to do
the arithmetic themselves) cannot use these objects.

A key type is one class and one row of :data:`CLASSES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Self

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from .errors import InvalidInput, KeyNotExtractable, MechanismNotSupported
from .mechanisms import Mechanism

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

    from .api import Key

#: what ``cryptography`` passes as data (``cryptography.utils.Buffer`` in recent versions)
Buffer = bytes | bytearray | memoryview


def _hash_of(algorithm: object) -> tuple[hashes.HashAlgorithm, bool]:
    """(the hash, whether the data is already its digest) of a hash or ``Prehashed``."""
    if isinstance(algorithm, Prehashed):
        return algorithm._algorithm, True
    if isinstance(algorithm, hashes.HashAlgorithm):
        return algorithm, False
    raise MechanismNotSupported(
        f"the HSM signs a hash: give a cryptography hash (hashes.SHA256()) or "
        f"Prehashed(hash), not {type(algorithm).__name__}"
    )


def _mechanism(family: str, algorithm: hashes.HashAlgorithm, what: str) -> Mechanism:
    """The mechanism ``{family}-{hash}`` (``rsa-pss-sha256``), or an error naming the hashes."""
    try:
        return Mechanism(f"{family}-{algorithm.name}")
    except ValueError:
        offered = [
            m.value.rsplit("-", 1)[1].upper() for m in Mechanism if m.value.startswith(family + "-")
        ]
        raise MechanismNotSupported(
            f"{what} with {algorithm.name.upper()} has no HSM mechanism; "
            f"use one of these hashes: {', '.join(offered)}"
        ) from None


def _check_mgf(mgf: object, algorithm: hashes.HashAlgorithm, what: str) -> None:
    mgf_hash = getattr(mgf, "_algorithm", None)
    if not isinstance(mgf, _padding.MGF1) or getattr(mgf_hash, "name", None) != algorithm.name:
        raise MechanismNotSupported(
            f"{what} runs in the HSM with MGF1 over the same hash only; "
            f"use mgf=padding.MGF1(hashes.{algorithm.name.upper()}())"
        )


def _check_pss_salt(pss: _padding.PSS, algorithm: hashes.HashAlgorithm, key_size: int) -> None:
    """The HSM's PSS salt is the digest length; refuse any other salt length.

    ``PSS.DIGEST_LENGTH`` and an int equal to the digest size are that;
    ``PSS.MAX_LENGTH`` is ``ceil((bits - 1) / 8) - digest - 2`` bytes (222 for
    RSA-2048 with SHA-256), which the X.509 builders would also write into the
    signature's AlgorithmIdentifier, so it cannot be signed with a shorter salt.
    """
    salt = pss._salt_length
    digest = algorithm.digest_size
    if salt is _padding.PSS.DIGEST_LENGTH or salt == digest:
        return
    if salt is _padding.PSS.MAX_LENGTH:
        maximum = (key_size + 6) // 8 - digest - 2
        if maximum == digest:
            return
        told = f"PSS.MAX_LENGTH ({maximum} bytes for this key)"
    elif salt is _padding.PSS.AUTO:
        told = "PSS.AUTO (only for verification)"
    else:
        told = f"{salt!r} bytes"
    raise MechanismNotSupported(
        f"the HSM signs RSA-PSS with a salt as long as the digest ({digest} bytes for "
        f"{algorithm.name.upper()}), not {told}; use salt_length=padding.PSS.DIGEST_LENGTH"
    )


def _not_extractable(key: Key, what: str) -> NoReturn:
    raise KeyNotExtractable(
        f"key {key.label!r} cannot {what}: its private key cannot leave the HSM. "
        "Sign (or decrypt) with the key object instead, and export only the public key "
        "(public_key(), key.public_key_pem())"
    )


class _InsideHSM:
    """What every HSM key class shares: the hsmbridge key, and nothing private to give."""

    def __init__(self, key: Key, *, allow_pkcs1v15: bool = False) -> None:
        self.hsm_key = key
        #: RSA: whether ``decrypt`` takes PKCS1v15 padding (a padding oracle; see Key.decrypt)
        self.allow_pkcs1v15 = allow_pkcs1v15

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.hsm_key!r}>"

    @property
    def key_size(self) -> int:
        return self.hsm_key.spec.size

    def private_numbers(self) -> NoReturn:
        _not_extractable(self.hsm_key, "give its private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        _not_extractable(self.hsm_key, "give its private key bytes")

    def __copy__(self) -> Self:
        return self  # a handle on one HSM key: nothing to copy

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


class HSMRSAPrivateKey(_InsideHSM, rsa.RSAPrivateKey):
    """An RSA key in the HSM as a ``cryptography`` ``RSAPrivateKey``."""

    def __init__(self, key: Key, *, allow_pkcs1v15: bool = False) -> None:
        super().__init__(key, allow_pkcs1v15=allow_pkcs1v15)
        self._public: rsa.RSAPublicKey | None = None

    def public_key(self) -> rsa.RSAPublicKey:
        if self._public is None:
            public = self.hsm_key.public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            self._public = public
        return self._public

    def sign(
        self,
        data: Buffer,
        padding: _padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        """Sign in the HSM: PKCS1v15, or PSS with MGF1 and a digest-length salt."""
        hash_alg, prehashed = _hash_of(algorithm)
        if isinstance(padding, _padding.PKCS1v15):
            mech = _mechanism("rsa-pkcs1", hash_alg, "RSA PKCS#1 v1.5 signing")
        elif isinstance(padding, _padding.PSS):
            _check_mgf(padding.mgf, hash_alg, "RSA-PSS signing")
            _check_pss_salt(padding, hash_alg, self.key_size)
            mech = _mechanism("rsa-pss", hash_alg, "RSA-PSS signing")
        else:
            raise MechanismNotSupported(
                f"RSA signing with {type(padding).__name__} padding has no HSM mechanism; "
                "use padding.PKCS1v15() or padding.PSS(...)"
            )
        return self.hsm_key.sign(bytes(data), mech, prehashed=prehashed)

    def decrypt(self, ciphertext: Buffer, padding: _padding.AsymmetricPadding) -> bytes:
        """Decrypt in the HSM: PKCS1v15, or OAEP with MGF1 over the same hash and no label."""
        if isinstance(padding, _padding.PKCS1v15):
            if not self.allow_pkcs1v15:
                raise InvalidInput(
                    "PKCS1v15 decryption is a padding oracle (Bleichenbacher); use OAEP, or get "
                    "the key with key.private_key(allow_pkcs1v15=True) if the sender can only "
                    "encrypt with PKCS#1 v1.5"
                )
            return self.hsm_key.decrypt(bytes(ciphertext), Mechanism.RSA_PKCS1, allow_pkcs1v15=True)
        if isinstance(padding, _padding.OAEP):
            _check_mgf(padding.mgf, padding.algorithm, "RSA-OAEP decryption")
            if padding._label:
                raise MechanismNotSupported(
                    "RSA-OAEP decryption in the HSM takes no label; use OAEP(..., label=None)"
                )
            mech = _mechanism("rsa-oaep", padding.algorithm, "RSA-OAEP decryption")
            return self.hsm_key.decrypt(bytes(ciphertext), mech)
        raise MechanismNotSupported(
            f"RSA decryption with {type(padding).__name__} padding has no HSM mechanism; "
            "use padding.OAEP(...) or padding.PKCS1v15()"
        )


class HSMECPrivateKey(_InsideHSM, ec.EllipticCurvePrivateKey):
    """An EC key in the HSM as a ``cryptography`` ``EllipticCurvePrivateKey``."""

    def __init__(self, key: Key, *, allow_pkcs1v15: bool = False) -> None:
        super().__init__(key, allow_pkcs1v15=allow_pkcs1v15)
        self._public: ec.EllipticCurvePublicKey | None = None

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._public is None:
            public = self.hsm_key.public_key()
            assert isinstance(public, ec.EllipticCurvePublicKey)
            self._public = public
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA in the HSM; the signature is DER, as ``cryptography`` gives it."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise MechanismNotSupported(
                f"EC signing with {type(signature_algorithm).__name__} has no HSM mechanism; "
                "use ec.ECDSA(hashes.SHA256())"
            )
        if signature_algorithm.deterministic_signing:
            raise MechanismNotSupported(
                "the HSM's ECDSA is randomised; deterministic (RFC 6979) signatures cannot be "
                "made there. Use ec.ECDSA(hash) without deterministic_signing"
            )
        hash_alg, prehashed = _hash_of(signature_algorithm.algorithm)
        mech = _mechanism("ecdsa", hash_alg, "ECDSA signing")
        return self.hsm_key.sign(bytes(data), mech, prehashed=prehashed)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _not_extractable(self.hsm_key, "do an ECDH key exchange (hsmbridge keys sign only)")


class HSMEd25519PrivateKey(_InsideHSM, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in the HSM as a ``cryptography`` ``Ed25519PrivateKey`` (pure EdDSA)."""

    def __init__(self, key: Key, *, allow_pkcs1v15: bool = False) -> None:
        super().__init__(key, allow_pkcs1v15=allow_pkcs1v15)
        self._public: ed25519.Ed25519PublicKey | None = None

    def public_key(self) -> ed25519.Ed25519PublicKey:
        if self._public is None:
            public = self.hsm_key.public_key()
            assert isinstance(public, ed25519.Ed25519PublicKey)
            self._public = public
        return self._public

    def sign(self, data: Buffer) -> bytes:
        """Ed25519 in the HSM over the message itself (RFC 8032)."""
        return self.hsm_key.sign(bytes(data), Mechanism.ED25519)

    def private_bytes_raw(self) -> NoReturn:
        _not_extractable(self.hsm_key, "give its private key bytes")


HSMPrivateKey = HSMRSAPrivateKey | HSMECPrivateKey | HSMEd25519PrivateKey
#: key type (``Key.key_type``) -> the ``cryptography`` private key class for it
CLASSES: dict[str, type[HSMPrivateKey]] = {
    "rsa": HSMRSAPrivateKey,
    "ec": HSMECPrivateKey,
    "ed25519": HSMEd25519PrivateKey,
}


def private_key(key: Key, *, allow_pkcs1v15: bool = False) -> HSMPrivateKey:
    """``key`` as a ``cryptography`` private key whose operations run in the HSM.

    ``allow_pkcs1v15``: RSA ``decrypt`` takes ``PKCS1v15()`` padding (opt-in, as
    for :meth:`hsmbridge.api.Key.decrypt`).
    """
    try:
        cls = CLASSES[key.key_type]
    except KeyError:
        raise MechanismNotSupported(
            f"{key.key_type} keys have no cryptography private key class here; "
            f"key types with one: {', '.join(CLASSES)}"
        ) from None
    return cls(key, allow_pkcs1v15=allow_pkcs1v15)
