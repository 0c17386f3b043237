"""Backend-neutral types: key specs, key info, and the HSM/Key interface.

A backend implements :class:`HSM` (generate, import, find, list) and
:class:`Key` (public key DER, delete, and one *engine hook*, :meth:`Key._run`).
Everything a user calls — mechanism checks, hashing, signature encodings,
exports, batching and streaming — is written once here, so every backend
behaves the same.

The engine hook (docs/design.md, "Engine hook"): prepared items in — digests
(DigestInfo-prefixed for PKCS#1 v1.5, see :mod:`hsmbridge.mechanisms`) to sign,
or ciphertexts — and one ``bytes | HSMError`` per item out. ``sign`` and
``decrypt`` call it with one item, batches and streams with many, so
``Key.sign`` is three hops from the HSM call: ``Key.sign`` -> backend ``_run``
-> engine -> ``C_Sign`` (PKCS#11) or ``POST /keys/{id}/sign`` (NetHSM).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from . import curves, export
from .batch import stream_batches
from .errors import (
    AmbiguousKey,
    BatchItemError,
    ConfigurationError,
    HSMError,
    InvalidInput,
    KeyExpired,
    KeyNotFound,
    KeyNotYetValid,
    MechanismNotSupported,
)
from .mechanisms import (
    RAW_USAGE,
    Mechanism,
    check_key_type,
    check_signature_format,
    parse_mechanism,
    signing_preparer,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

    from .crypto_keys import HSMPrivateKey
    from .onetime import OneTimeKeys, OneTimeStore
    from .rings import KeyRing, KeyVersion, RingStore

#: what a key can be made for: signing, decryption with padding, or raw RSA
#: decryption (alone: see :func:`normalize_usage`)
USAGES: frozenset[str] = frozenset({"sign", "decrypt", RAW_USAGE})
#: what the engine hook does with its items
Op = Literal["sign", "decrypt"]
#: one engine result: the output, the item's error, or None (never attempted:
#: an earlier item failed and the batch stopped)
Result = bytes | HSMError | None


@dataclass(frozen=True)
class RSA:
    """An RSA key of ``bits`` bits (1024-8192, a multiple of 8; 2048+ for real use)."""

    bits: int = 2048
    key_type: ClassVar[str] = "rsa"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1024 <= self.bits <= 8192 or self.bits % 8:
            raise InvalidInput(
                f"RSA key size must be a multiple of 8 between 1024 and 8192 bits, "
                f"got {self.bits!r}; use RSA(2048), RSA(3072) or RSA(4096)"
            )

    @property
    def size(self) -> int:
        return self.bits

    def __str__(self) -> str:
        return f"rsa:{self.bits}"


class _OnCurve:
    """What a key on a named curve knows of it: EC and Ed25519 specs share this."""

    curve: str

    @property
    def curve_info(self) -> curves.Curve:
        """Everything hsmbridge knows about this curve (OID, NetHSM type, JWK form, ...)."""
        return curves.get(self.curve)

    @property
    def size(self) -> int:
        return self.curve_info.bits

    @property
    def field_bytes(self) -> int:
        """Bytes of one coordinate (and of each half of a raw ECDSA or EdDSA signature)."""
        return self.curve_info.field_bytes


@dataclass(frozen=True)
class EC(_OnCurve):
    """An elliptic-curve key on a named curve (:data:`hsmbridge.curves.CURVES`)."""

    curve: str = "P-256"
    key_type: ClassVar[str] = "ec"

    def __post_init__(self) -> None:
        found = curves.by_name(self.curve)
        if found is None:
            raise InvalidInput(f"unknown curve {self.curve!r}; use EC(curve) with {curves.NAMES}")
        if found.kind != "weierstrass":
            raise InvalidInput(
                f"{found.name} is an Edwards curve for EdDSA, not ECDSA; use {found.name}()"
            )
        object.__setattr__(self, "curve", found.name)

    def __str__(self) -> str:
        return f"ec:{self.curve.replace('-', '').lower()}"


@dataclass(frozen=True)
class Ed25519(_OnCurve):
    """An Ed25519 key (pure EdDSA, RFC 8032): signs the message itself with ``ed25519``."""

    curve: str = field(default="Ed25519", init=False, repr=False)
    key_type: ClassVar[str] = "ed25519"

    def __str__(self) -> str:
        return "ed25519"


KeySpec = RSA | EC | Ed25519
#: the spec classes of :data:`KeySpec`, for isinstance checks
SPEC_CLASSES = (RSA, EC, Ed25519)


def curve_spec(curve: curves.Curve) -> EC | Ed25519:
    """The spec of a key on ``curve``: ``EC(name)`` or, for Edwards curves, its own class."""
    return Ed25519() if curve.kind == "edwards" else EC(curve.name)


def parse_key_spec(text: str) -> KeySpec:
    """``rsa:2048`` / ``ec:p256`` / ``ed25519`` (the command line's form) to a spec."""
    kind, _, arg = text.strip().lower().partition(":")
    if kind == "rsa":
        try:
            return RSA(int(arg or 2048))
        except ValueError:
            pass
    elif kind == "ec":
        return EC(arg or "P-256")
    elif kind == "ed25519" and not arg:
        return Ed25519()
    ec_names = ", ".join("ec:" + c.name.replace("-", "").lower() for c in curves.WEIERSTRASS)
    raise InvalidInput(
        f"unknown key type {text!r}; use rsa:2048, rsa:3072, rsa:4096, {ec_names} or ed25519"
    )


def normalize_usage(usage: Iterable[str] | str | None, spec: KeySpec) -> frozenset[str]:
    """Check a usage set; default is ``{"sign"}`` (one purpose per key)."""
    if usage is None:
        return frozenset({"sign"})
    if isinstance(usage, str):
        items = {usage}
    elif isinstance(usage, (set, frozenset, list, tuple)) and all(
        isinstance(u, str) for u in usage
    ):
        items = set(usage)
    else:
        raise InvalidInput(
            f"usage must be 'sign', 'decrypt', '{RAW_USAGE}' or a set of them, "
            f"not {type(usage).__name__}"
        )
    unknown = items - USAGES
    if unknown or not items:
        raise InvalidInput(
            f"usage must be a non-empty subset of {{'sign', 'decrypt'}}, or {{'{RAW_USAGE}'}}, "
            f"got {sorted(items)!r}"
        )
    if spec.key_type != "rsa" and items - {"sign"}:
        raise InvalidInput(
            f"{spec.key_type.upper()} keys cannot decrypt; use an RSA key for usage "
            f"{sorted(items - {'sign'})[0]!r}"
        )
    if RAW_USAGE in items and len(items) > 1:
        raise InvalidInput(
            f"usage '{RAW_USAGE}' stands alone: raw RSA decryption is the private-key "
            "operation itself, so on a key that also signs or decrypts with padding it would "
            "forge that key's signatures and strip the padding of its ciphertexts; make one "
            f"key with usage={{'{RAW_USAGE}'}} and another for {sorted(items - {RAW_USAGE})}"
        )
    return frozenset(items)


def require_usage(info: KeyInfo, mech: Mechanism) -> None:
    """What every backend's engine checks first: the key was made for ``mech``'s usage."""
    if mech.usage in info.usage:
        return
    if mech.usage == RAW_USAGE:
        raise InvalidInput(
            f"key {info.label!r} was not made for raw decryption (its usage is "
            f"{sorted(info.usage)}): {mech.value} is the RSA private-key operation itself, "
            "which signs anything and strips any padding, so it runs only on a key made for "
            f"it alone; generate a key with usage={{'{RAW_USAGE}'}}"
        )
    raise InvalidInput(
        f"key {info.label!r} was not made for {mech.usage} (its usage is "
        f"{sorted(info.usage)}); generate a key with usage={{'{mech.usage}'}}"
    )


def check_new_key(spec: KeySpec, label: str, usage: Iterable[str] | str | None) -> frozenset[str]:
    """What every backend checks before generating: spec, label, usage (returned)."""
    if not isinstance(spec, SPEC_CLASSES):
        raise InvalidInput(f"spec must be RSA(bits), EC(curve) or Ed25519(), not {spec!r}")
    if not label or not isinstance(label, str):
        raise InvalidInput("a key needs a non-empty label")
    check_label_length(label)
    return normalize_usage(usage, spec)


#: the longest label hsmbridge writes (UTF-8 bytes): room for any naming scheme,
#: small enough that a label never costs a token or a message much
MAX_LABEL_BYTES = 255


def check_label_length(label: str) -> None:
    size = len(label.encode("utf-8", "surrogatepass"))
    if size > MAX_LABEL_BYTES:
        raise InvalidInput(
            f"a label is at most {MAX_LABEL_BYTES} bytes of UTF-8, this one is {size}: "
            f"{label[:40]!r}...; use a shorter label"
        )


def check_lookup(label: object, key_id: object) -> str:
    """What every backend checks in ``get_key``; returns ``label 'x' and id 'y'`` for messages."""
    if label is None and key_id is None:
        raise InvalidInput("get_key needs a label or a key_id")
    for name, value in (("label", label), ("key_id", key_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidInput(
                f"get_key's {name} must be a non-empty str, not {type(value).__name__} "
                f"{str(value)[:40]!r}"
            )
        if isinstance(value, str):
            check_label_length(value)
    return " and ".join(
        f"{k} {v!r}" for k, v in (("label", label), ("id", key_id)) if v is not None
    )


@dataclass(frozen=True)
class KeyInfo:
    """What a key is, without touching it: label, id, type, size, usage."""

    label: str
    id: str
    spec: KeySpec
    usage: frozenset[str] = field(default_factory=frozenset)

    @property
    def key_type(self) -> str:
        return self.spec.key_type

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def curve(self) -> str | None:
        return None if isinstance(self.spec, RSA) else self.spec.curve

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "id": self.id,
            "type": self.key_type,
            "size": self.size,
            "curve": self.curve,
            "usage": sorted(self.usage),
        }


#: the current time, timezone-aware; what ``hsmbridge.open(..., clock=)`` takes
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The real time, UTC."""
    return datetime.now(UTC)


def check_expires_in(expires_in: object) -> None:
    """``expires_in`` of generate_key: None or a positive timedelta."""
    if expires_in is not None and (
        not isinstance(expires_in, timedelta) or expires_in <= timedelta(0)
    ):
        raise InvalidInput(
            f"expires_in must be a positive datetime.timedelta, got {expires_in!r}; "
            "e.g. expires_in=timedelta(minutes=15)"
        )


@dataclass(frozen=True)
class Validity:
    """When a key may be used (``[not_before, not_after)``), and how to name it when not.

    Checked by :meth:`Key.sign`/:meth:`Key.decrypt` and the batch methods
    before the HSM is asked, against the HSM handle's clock.
    """

    not_before: datetime | None
    not_after: datetime | None
    clock: Clock
    #: ``key 't'`` or ``version 2 of ring 'payments'``, for messages
    name: str

    def check(self) -> None:
        now = self.clock()
        if self.not_after is not None and now >= self.not_after:
            raise KeyExpired(
                f"{self.name} expired at {self.not_after.isoformat()} (now "
                f"{now.isoformat()}); use a newer key or ring version"
            )
        if self.not_before is not None and now < self.not_before:
            raise KeyNotYetValid(
                f"{self.name} is not valid before {self.not_before.isoformat()} (now "
                f"{now.isoformat()}); use the ring's primary until then"
            )


def default_threads() -> int:
    """Default batch parallelism: one worker per core."""
    return max(1, os.cpu_count() or 1)


class Key(abc.ABC):
    """A key inside the HSM. Private material never leaves it."""

    #: the key-ring version this key is (None for a plain key), and its ring
    version: int | None = None
    ring: str | None = None

    def __init__(self, info: KeyInfo) -> None:
        self.info = info
        self._der: bytes | None = None
        self._validity: Validity | None = None
        self._validity_loaded = False
        self._kid: str | None = None

    # -- what a backend provides ------------------------------------------------

    @abc.abstractmethod
    def _fetch_public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of this key."""

    @abc.abstractmethod
    def _run(
        self,
        op: Op,
        mech: Mechanism,
        items: Sequence[bytes],
        *,
        threads: int,
        stop_on_error: bool,
        ecdsa_format: str,
    ) -> list[Result]:
        """The engine hook: run ``op`` with ``mech`` on every prepared item.

        Returns one entry per item, in order: the output, the item's own
        :class:`HSMError`, or None for items never attempted because
        ``stop_on_error`` stopped the batch after a failure. ECDSA signatures
        come in ``ecdsa_format`` (``"der"`` or ``"raw"``), which the backend
        makes from its natural encoding the cheapest way. Raises
        :class:`HSMError` for failures of the whole call (usage, a mechanism
        the HSM lacks, no session or connection). Callers have checked the
        mechanism's family against the key type and prepared every item.
        """

    @abc.abstractmethod
    def _delete(self) -> None:
        """Destroy the key (private and public halves) in the HSM."""

    @abc.abstractmethod
    def _fetch_certificate_der(self) -> bytes | None:
        """The DER of the certificate stored with this key, or None."""

    @abc.abstractmethod
    def _store_certificate(self, cert: x509.Certificate) -> None:
        """Store ``cert`` with this key, replacing any certificate it had."""

    @abc.abstractmethod
    def _delete_certificate(self) -> bool:
        """Remove the key's certificate; False when it had none."""

    def _default_threads(self) -> int:
        return default_threads()

    def _load_validity(self) -> Validity | None:
        """The key's stored lifetime (``generate_key(..., expires_in=)``), if any."""
        return None

    # -- lifetime ----------------------------------------------------------------

    @property
    def validity(self) -> Validity | None:
        """When the key may be used; None when it never expires. Read once per object."""
        if not self._validity_loaded:
            self._validity = self._load_validity()
            self._validity_loaded = True
        return self._validity

    @validity.setter
    def validity(self, value: Validity | None) -> None:
        self._validity, self._validity_loaded = value, True

    @property
    def not_before(self) -> datetime | None:
        return self.validity.not_before if self.validity is not None else None

    @property
    def not_after(self) -> datetime | None:
        return self.validity.not_after if self.validity is not None else None

    @property
    def kid(self) -> str:
        """The JWK ``kid``: the RFC 7638 thumbprint (computed once per object)."""
        if self._kid is None:
            self._kid = self.jwk_thumbprint()
        return self._kid

    # -- identity ----------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.info.label

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def key_type(self) -> str:
        return self.info.key_type

    @property
    def spec(self) -> KeySpec:
        return self.info.spec

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} label={self.label!r} id={self.id!r} "
            f"{self.spec} usage={sorted(self.info.usage)}>"
        )

    # -- public key exports ------------------------------------------------------

    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo, DER."""
        if self._der is None:
            self._der = self._fetch_public_key_der()
        return self._der

    def public_key_pem(self) -> str:
        """SubjectPublicKeyInfo PEM: 64-column base64 lines, ``\\n`` endings."""
        return export.der_to_pem(self.public_key_der())

    def public_key_jwk(self) -> dict[str, str]:
        """JWK (RFC 7517) with ``kid`` set to the RFC 7638 thumbprint."""
        return export.jwk(self.public_key_der())

    def jwk_thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint, base64url without padding."""
        return export.jwk_thumbprint(export.jwk(self.public_key_der()))

    def upload_json(self, min_bits: int = 2048, *, key_type: str | None = None) -> str:
        """``{"public_key": "<PEM>"}``, refusing keys weaker than ``min_bits``.

        With ``key_type`` (``"rsa"``, ``"ec"``), also refuses a key of another algorithm.
        """
        return export.upload_json(self.public_key_der(), min_bits=min_bits, key_type=key_type)

    def public_key(self) -> PublicKeyTypes:
        """The public half as a ``cryptography`` key object (for verification)."""
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        return load_der_public_key(self.public_key_der())

    # -- cryptography and certificates ---------------------------------------------------

    def private_key(self, *, allow_pkcs1v15: bool = False) -> HSMPrivateKey:
        """This key as a ``cryptography`` private key whose sign/decrypt run in the HSM.

        RSA ``decrypt`` with ``PKCS1v15()`` needs ``allow_pkcs1v15=True`` (see :meth:`decrypt`).
        """
        from .crypto_keys import private_key

        return private_key(self, allow_pkcs1v15=allow_pkcs1v15)

    def certificate(self) -> x509.Certificate | None:
        """The certificate stored with this key in the HSM, or None."""
        from cryptography import x509

        der = self._fetch_certificate_der()
        return None if der is None else x509.load_der_x509_certificate(der)

    def set_certificate(self, cert: x509.Certificate | bytes | str) -> x509.Certificate:
        """Store a certificate (object, PEM or DER) for this key, replacing any other.

        Refuses a certificate of another public key.
        """
        from . import certificates

        loaded = certificates.load_certificate(cert)
        certificates.check_belongs(loaded, self)
        self._store_certificate(loaded)
        return loaded

    def delete_certificate(self) -> bool:
        """Remove this key's certificate; False when it had none."""
        return self._delete_certificate()

    def csr(
        self, subject: str | x509.Name, *, sans: Iterable[str] = ()
    ) -> x509.CertificateSigningRequest:
        """A PKCS#10 request (RFC 4514 ``subject``, ``DNS:``/``IP:`` SANs) signed in the HSM."""
        from . import certificates

        return certificates.build_csr(self, subject, sans)

    def self_signed(
        self,
        subject: str | x509.Name,
        *,
        days: int = 365,
        sans: Iterable[str] = (),
        ca: bool = False,
    ) -> x509.Certificate:
        """A self-signed certificate for this key (not stored: see :meth:`set_certificate`)."""
        from . import certificates

        return certificates.build_self_signed(self, subject, days=days, sans=sans, ca=ca)

    # -- single operations ---------------------------------------------------------

    def sign(
        self,
        data: bytes,
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
    ) -> bytes:
        """Sign ``data`` (or its digest, with ``prehashed=True``).

        ECDSA signatures are DER by default; ``signature_format="raw"`` gives r‖s.
        """
        mech = self._check(mechanism, sign=True)
        fmt = check_signature_format(signature_format)
        prepared = signing_preparer(mech, prehashed=_flag(prehashed, "prehashed"))(data)
        return _only(self._run("sign", mech, [prepared], **_ONE, ecdsa_format=fmt))

    def sign_prepared(
        self, prepared: bytes, mechanism: str | Mechanism, *, signature_format: str = "der"
    ) -> bytes:
        """Sign input already in the form the HSM signs, for callers that hash themselves.

        ``prepared`` is the digest (PSS, ECDSA) or the DigestInfo-prefixed
        digest (PKCS#1 v1.5), as NetHSM's sign modes take it; ``mechanism``
        names the operation. No hashing or length check of the digest is done.
        """
        mech = self._check(mechanism, sign=True)
        fmt = check_signature_format(signature_format)
        data = _as_bytes(prepared, "data to sign")
        return _only(self._run("sign", mech, [data], **_ONE, ecdsa_format=fmt))

    def decrypt(
        self, ciphertext: bytes, mechanism: str | Mechanism, *, allow_pkcs1v15: bool = False
    ) -> bytes:
        """Decrypt one ciphertext inside the HSM.

        ``rsa-pkcs1`` (PKCS#1 v1.5) needs ``allow_pkcs1v15=True``: see :func:`_check_decrypt`.
        """
        mech = self._check_decrypt(mechanism, allow_pkcs1v15)
        data = self._ciphertexts(mech)(ciphertext)
        return _only(self._run("decrypt", mech, [data], **_ONE, ecdsa_format="der"))

    def _check(self, mechanism: str | Mechanism, *, sign: bool) -> Mechanism:
        mech = parse_mechanism(mechanism, sign=sign)
        check_key_type(mech, self.key_type, self.label)
        validity = self.validity
        if validity is not None:
            validity.check()
        return mech

    def _check_decrypt(self, mechanism: str | Mechanism, allow_pkcs1v15: bool) -> Mechanism:
        """A decrypt mechanism; PKCS#1 v1.5 only when the caller opts in.

        PKCS#1 v1.5 decryption is a padding oracle by nature (Bleichenbacher
        1998, ROBOT 2017): a service that tells apart, in any way, ciphertexts
        with bad padding lets an attacker decrypt or sign with the key. OAEP
        is the default everywhere; a caller whose partner can only encrypt
        with v1.5 must say so on every call.

        Raw RSA (``rsa-raw``) is gated at the key instead: it runs only on a key
        made for it alone (usage ``decrypt-raw``, see :func:`normalize_usage`),
        which the token itself keeps to it (docs/design.md, "Raw RSA decryption").
        """
        mech = self._check(mechanism, sign=False)
        if mech is Mechanism.RSA_PKCS1 and allow_pkcs1v15 is not True:
            raise InvalidInput(
                "rsa-pkcs1 (PKCS#1 v1.5) decryption is a padding oracle (Bleichenbacher); use "
                "rsa-oaep-sha256 or rsa-oaep-sha1, or pass allow_pkcs1v15=True if the sender "
                "can only encrypt with PKCS#1 v1.5"
            )
        return mech

    def _ciphertexts(self, mech: Mechanism) -> Callable[[object], bytes]:
        """The check of ``mech``'s ciphertexts: :meth:`_ciphertext`, and for raw RSA
        the modulus-length block of an integer below the modulus.

        Raw decryption has no padding to fail, so checking the integer here (the
        modulus is public) reveals nothing and spares tokens that answer it with a
        bare CKR_GENERAL_ERROR (SoftHSM2), as they answer a block shorter than
        the modulus.
        """
        if mech is not Mechanism.RSA_RAW:
            return self._ciphertext
        require_usage(self.info, mech)  # before reading the key, as the engine would
        from cryptography.hazmat.primitives.asymmetric import rsa

        public = self.public_key()
        assert isinstance(public, rsa.RSAPublicKey)  # check_key_type: an RSA key
        modulus = public.public_numbers().n
        size = (modulus.bit_length() + 7) // 8

        def block(ct: object) -> bytes:
            data = self._ciphertext(ct)
            if int.from_bytes(data, "big") >= modulus:
                raise InvalidInput(
                    f"the ciphertext is not below key {self.label!r}'s modulus; raw RSA "
                    "decrypts integers 0 <= c < n (was it made for another key?)"
                )
            return data.rjust(size, b"\0")

        return block

    def _ciphertext(self, ct: object) -> bytes:
        """A ciphertext as bytes, no longer than the RSA modulus."""
        data = _as_bytes(ct, "ciphertext")
        limit = (self.spec.size + 7) // 8
        if len(data) > limit:
            raise InvalidInput(
                f"the ciphertext is {len(data)} bytes but key {self.label!r} "
                f"({self.spec}) takes {limit}-byte ciphertexts; was it made for another key?"
            )
        return data

    # -- batches and streams ---------------------------------------------------------

    def sign_batch(
        self,
        messages: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
        threads: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Sign many messages in parallel; results in input order.

        By default the first failing item raises :class:`BatchItemError` with
        its ``index`` (even in a one-item batch; :meth:`sign` raises the item's
        own error). With ``return_exceptions=True`` failed items hold their
        :class:`HSMError` and the rest still complete.
        """
        mech = self._check(mechanism, sign=True)
        fmt = check_signature_format(signature_format)
        items = _prepare_all(
            messages,
            signing_preparer(mech, prehashed=_flag(prehashed, "prehashed")),
            _flag(return_exceptions, "return_exceptions"),
        )
        return self._run_batch("sign", mech, items, threads, return_exceptions, fmt)

    def decrypt_batch(
        self,
        ciphertexts: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        threads: int | None = None,
        return_exceptions: bool = False,
        allow_pkcs1v15: bool = False,
    ) -> list[Any]:
        """Decrypt many ciphertexts in parallel; results in input order (see sign_batch)."""
        mech = self._check_decrypt(mechanism, allow_pkcs1v15)
        items = _prepare_all(ciphertexts, self._ciphertexts(mech), return_exceptions)
        return self._run_batch("decrypt", mech, items, threads, return_exceptions, "der")

    def _run_batch(
        self,
        op: Op,
        mech: Mechanism,
        items: list[bytes | HSMError],
        threads: int | None,
        return_exceptions: bool,
        ecdsa_format: str,
    ) -> list[Any]:
        """Run the valid items through the engine hook; input errors keep their places."""
        valid = [i for i, item in enumerate(items) if not isinstance(item, HSMError)]
        todo: list[Any] = items if len(valid) == len(items) else [items[i] for i in valid]
        results: list[Any] = items
        if todo:
            n_threads = min(_threads(threads) or self._default_threads(), len(todo))
            out = self._run(
                op,
                mech,
                todo,
                threads=n_threads,
                stop_on_error=not return_exceptions,
                ecdsa_format=ecdsa_format,
            )
            if todo is items:  # the common case: every item was valid
                results = out
            else:
                for i, result in zip(valid, out, strict=True):
                    results[i] = result
        if not return_exceptions:
            for i, result in enumerate(results):
                if isinstance(result, HSMError):
                    raise BatchItemError(i, result)
        return results

    def sign_many(
        self,
        messages: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
        threads: int | None = None,
        window: int | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Stream signatures in order, holding at most ``window`` items in flight."""
        self._check(mechanism, sign=True)
        check_signature_format(signature_format)
        return stream_batches(
            messages,
            lambda chunk: self.sign_batch(
                chunk,
                mechanism,
                prehashed=prehashed,
                signature_format=signature_format,
                threads=threads,
                return_exceptions=return_exceptions,
            ),
            _window(window, threads),
        )

    def decrypt_many(
        self,
        ciphertexts: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        threads: int | None = None,
        window: int | None = None,
        return_exceptions: bool = False,
        allow_pkcs1v15: bool = False,
    ) -> Iterator[Any]:
        """Stream plaintexts in order, holding at most ``window`` items in flight."""
        self._check_decrypt(mechanism, allow_pkcs1v15)
        return stream_batches(
            ciphertexts,
            lambda chunk: self.decrypt_batch(
                chunk,
                mechanism,
                threads=threads,
                return_exceptions=return_exceptions,
                allow_pkcs1v15=allow_pkcs1v15,
            ),
            _window(window, threads),
        )

    def delete(self) -> None:
        """Destroy the key in the HSM. It cannot be recovered."""
        self._delete()


#: engine-hook arguments of a single operation
_ONE: dict[str, Any] = {"threads": 1, "stop_on_error": True}


def _only(results: list[Result]) -> bytes:
    """The output of a one-item engine call, or the item's error raised."""
    [result] = results
    if isinstance(result, HSMError):
        raise result
    assert result is not None  # one item is always attempted
    return result


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidInput(f"{what} must be bytes, not {type(value).__name__}")


def _prepare_all(
    items: Iterable[Any], prepare: Any, return_exceptions: bool
) -> list[bytes | HSMError]:
    """``prepare`` every item; an input error raises at once, or stays in place."""
    out: list[bytes | HSMError] = []
    for item in items:
        try:
            out.append(prepare(item))
        except HSMError as exc:
            if not return_exceptions:
                raise BatchItemError(len(out), exc) from None
            out.append(exc)
    return out


def _threads(threads: object) -> int | None:
    """None (the backend's default) or a thread count; below 1 means one thread."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool):
        raise InvalidInput(f"threads must be a whole number, not {type(threads).__name__}")
    return max(1, threads)


def _default_window(threads: int | None) -> int:
    return 256 * max(1, _threads(threads) or default_threads())


def _window(window: object, threads: int | None) -> int:
    if window is None:
        return _default_window(threads)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InvalidInput(f"window must be a whole number of items, at least 1, got {window!r}")
    return window


#: AES key sizes hsmbridge makes
AES_BITS = (128, 192, 256)
AES_BLOCK = 16


class SecretKey(abc.ABC):
    """An AES key inside the HSM: sensitive, never extractable, made there.

    It encrypts and decrypts in CBC mode without padding (NetHSM's
    ``AES_CBC``): the data is whole 16-byte blocks, the IV one block; padding
    is the caller's choice and business.
    """

    def __init__(self, label: str, key_id: str, bits: int) -> None:
        self.label = label
        self.id = key_id
        self.bits = bits

    def __repr__(self) -> str:
        return f"<{type(self).__name__} AES-{self.bits} label={self.label!r} id={self.id!r}>"

    def encrypt_cbc(self, plaintext: bytes, iv: bytes) -> bytes:
        return self._cbc(True, _blocks(plaintext, "plaintext"), _iv(iv))

    def decrypt_cbc(self, ciphertext: bytes, iv: bytes) -> bytes:
        return self._cbc(False, _blocks(ciphertext, "ciphertext"), _iv(iv))

    @abc.abstractmethod
    def _cbc(self, encrypt: bool, data: bytes, iv: bytes) -> bytes:
        """One CBC operation in the HSM on checked input."""

    @abc.abstractmethod
    def delete(self) -> None:
        """Destroy the key in the HSM."""


def _blocks(data: object, what: str) -> bytes:
    data = _as_bytes(data, what)
    if not data or len(data) % AES_BLOCK:
        raise InvalidInput(
            f"AES-CBC works on whole {AES_BLOCK}-byte blocks without padding; the {what} is "
            f"{len(data)} bytes (pad it first, e.g. PKCS#7)"
        )
    return data


def _iv(iv: object) -> bytes:
    iv = _as_bytes(iv, "iv")
    if len(iv) != AES_BLOCK:
        raise InvalidInput(f"the AES-CBC IV is {AES_BLOCK} bytes, got {len(iv)}")
    return iv


class HSM(abc.ABC):
    """A connection to one HSM (token or appliance). Use as a context manager."""

    #: short human description used in messages, e.g. ``token 'ci'``.
    description: str = "HSM"
    #: the time key lifetimes and key rings are checked against (``open(..., clock=)``)
    clock: Clock = staticmethod(system_clock)

    @abc.abstractmethod
    def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
        expires_in: timedelta | None = None,
    ) -> Key:
        """Generate a key pair inside the HSM: private half non-extractable.

        With ``expires_in`` the key's end of life is stored in the HSM with it:
        using it later raises :class:`KeyExpired`, and :meth:`sweep` destroys it.
        """

    @abc.abstractmethod
    def import_key(
        self,
        private_key: PrivateKeyTypes,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> Key:
        """Store a ``cryptography`` RSA or EC private key in the HSM, non-extractable.

        Its material existed outside the HSM: prefer :meth:`generate_key`.
        """

    def generate_secret_key(self, bits: int, label: str, *, key_id: str | None = None) -> SecretKey:
        """Generate an AES key inside the HSM (sensitive, never extractable)."""
        raise MechanismNotSupported(f"{self.description} does not make AES keys in hsmbridge")

    def get_secret_key(self, *, key_id: str) -> SecretKey:
        """The AES key with this id; :class:`KeyNotFound` if there is none."""
        raise KeyNotFound(f"{self.description} holds no AES keys hsmbridge can use")

    def supported_mechanisms(self) -> list[Mechanism] | None:
        """The mechanisms this HSM can perform, where it can say in advance (PKCS#11: what
        the token lists, corrected by probing); None where they are learned on first use."""
        return None

    @abc.abstractmethod
    def get_key(
        self, label: str | None = None, *, key_id: str | None = None, uri: str | None = None
    ) -> Key:
        """Exactly one key by label, id, or (PKCS#11) an RFC 7512 URI naming it
        (``pkcs11:object=payments;type=private``); :class:`KeyNotFound` /
        :class:`AmbiguousKey` else."""

    @property
    def key(self) -> Key:
        """The key the URI this HSM was opened with names (``object=`` / ``id=``)."""
        raise InvalidInput(
            f"the URI {self.description} was opened with names no key; add object=LABEL or "
            "id=%HEX to it, or use get_key"
        )

    @abc.abstractmethod
    def list_keys(self) -> list[KeyInfo]:
        """Every key pair the HSM holds that hsmbridge can use."""

    def get_key_by_certificate(self, subject: str | x509.Name) -> Key:
        """The one key whose stored certificate has this subject (RFC 4514 or ``x509.Name``)."""
        from .certificates import parse_name

        name = parse_name(subject)
        found = self._keys_with_certificate_subject(name)
        wanted = f"a certificate for {name.rfc4514_string()!r}"
        if not found:
            raise KeyNotFound(
                f"no key in {self.description} has {wanted}; store one with "
                "key.set_certificate(cert), or look the key up by label"
            )
        if len(found) > 1:
            raise AmbiguousKey(
                f"{len(found)} keys in {self.description} have {wanted} (labels: "
                + ", ".join(repr(k.label) for k in found)
                + "); look the key up by label or key_id"
            )
        return found[0]

    def _keys_with_certificate_subject(self, name: x509.Name) -> list[Key]:
        """Keys whose certificate's subject is ``name``: one look at every key.

        Backends that can search certificates by subject override this.
        """
        keys = [self.get_key(key_id=info.id) for info in self.list_keys()]
        return [k for k in keys if (c := k.certificate()) is not None and c.subject == name]

    def info(self) -> dict[str, Any]:
        """What hsmbridge knows about this HSM, for ``hsmbridge info`` (plain values)."""
        return {"hsm": self.description}

    # -- key lifecycle (hsmbridge.rings) ------------------------------------------------

    def ring_store(self) -> RingStore:
        """Where this backend keeps key-ring versions and key lifetimes."""
        raise ConfigurationError(f"{self.description} cannot keep key rings")

    def key_ring(self, name: str) -> KeyRing:
        """The versioned key ``name`` (created by its first ``rotate``)."""
        from .rings import KeyRing

        return KeyRing(self, name)

    def key_rings(self) -> list[KeyRing]:
        """Every key ring in the HSM, by name."""
        from .rings import KeyRing

        return [KeyRing(self, name) for name in self.ring_store().ring_names()]

    def sweep(self, *, dry_run: bool = False) -> list[KeyVersion]:
        """Destroy every expired ring version and expired plain key; returns them."""
        from .rings import sweep

        return sweep(self, dry_run=dry_run)

    # -- one-time keys (hsmbridge.onetime) ------------------------------------------------------

    def one_time_store(self) -> OneTimeStore:
        """Where this backend keeps one-time keys."""
        raise ConfigurationError(f"{self.description} cannot keep one-time keys")

    def one_time_keys(
        self,
        spec: KeySpec,
        *,
        ttl: timedelta = timedelta(minutes=15),
        pool: int = 16,
        signer: Any = None,
        **options: Any,
    ) -> OneTimeKeys:
        """One-time decryption keys issued from a pool pre-generated in this HSM.

        Each issued key decrypts once, in any process sharing the HSM, within
        ``ttl``; ``signer`` (a key ring or any key) signs each key's context
        JWT. Options: ``alg`` (JWE alg, default RSA-OAEP-256 where the HSM has
        it), ``name`` (the pool, shared by processes), ``refill_threads``,
        ``wait`` (how long issue() waits for the refill), ``context_alg``.
        See :class:`hsmbridge.onetime.OneTimeKeys`.
        """
        from .onetime import OneTimeKeys

        return OneTimeKeys(self, spec, ttl=ttl, pool=pool, signer=signer, **options)

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release sessions or connections. Idempotent."""

    def __enter__(self) -> HSM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
