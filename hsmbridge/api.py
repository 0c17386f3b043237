"""Backend-neutral types: key specs, key info, and the HSM/Key interface.

A backend implements :class:`HSM` and :class:`Key` by filling in a handful of
``_``-prefixed primitives (generate, find, sign a prepared input, decrypt,
delete, public key DER, and a worker for batches). Everything a user calls —
mechanism checks, hashing, signature encodings, exports, batching and
streaming — is written once here, so every backend behaves the same.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from . import export
from .batch import BatchWorker, run_batch, stream_batches
from .errors import BatchItemError, HSMError, InvalidInput
from .mechanisms import (
    Mechanism,
    check_key_type,
    check_signature_format,
    ecdsa_raw_to_der,
    parse_mechanism,
    signing_preparer,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

USAGES: frozenset[str] = frozenset({"sign", "decrypt"})

_CURVES = {
    "P-256": ("P-256", 256),
    "P256": ("P-256", 256),
    "SECP256R1": ("P-256", 256),
    "PRIME256V1": ("P-256", 256),
    "P-384": ("P-384", 384),
    "P384": ("P-384", 384),
    "SECP384R1": ("P-384", 384),
    "P-521": ("P-521", 521),
    "P521": ("P-521", 521),
    "SECP521R1": ("P-521", 521),
}


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


@dataclass(frozen=True)
class EC:
    """An elliptic-curve key on a NIST curve: ``P-256``, ``P-384`` or ``P-521``."""

    curve: str = "P-256"
    key_type: ClassVar[str] = "ec"

    def __post_init__(self) -> None:
        canonical = _CURVES.get(str(self.curve).upper())
        if canonical is None:
            raise InvalidInput(
                f"unknown curve {self.curve!r}; use EC('P-256'), EC('P-384') or EC('P-521')"
            )
        object.__setattr__(self, "curve", canonical[0])

    @property
    def size(self) -> int:
        return _CURVES[self.curve][1]

    @property
    def field_bytes(self) -> int:
        return (self.size + 7) // 8

    def __str__(self) -> str:
        return f"ec:{self.curve.replace('-', '').lower()}"


KeySpec = RSA | EC


def parse_key_spec(text: str) -> KeySpec:
    """``rsa:2048`` / ``ec:p256`` (the command line's form) to a spec."""
    kind, _, arg = text.strip().lower().partition(":")
    if kind == "rsa":
        try:
            return RSA(int(arg or 2048))
        except ValueError:
            pass
    elif kind == "ec":
        return EC(arg or "P-256")
    raise InvalidInput(
        f"unknown key type {text!r}; use rsa:2048, rsa:3072, rsa:4096, ec:p256, ec:p384 or ec:p521"
    )


def normalize_usage(usage: Iterable[str] | str | None, spec: KeySpec) -> frozenset[str]:
    """Check a usage set; default is ``{"sign"}`` (one purpose per key)."""
    if usage is None:
        return frozenset({"sign"})
    items = {usage} if isinstance(usage, str) else set(usage)
    unknown = items - USAGES
    if unknown or not items:
        raise InvalidInput(
            f"usage must be a non-empty subset of {{'sign', 'decrypt'}}, got {sorted(items)!r}"
        )
    if spec.key_type == "ec" and "decrypt" in items:
        raise InvalidInput("EC keys cannot decrypt; use an RSA key for usage 'decrypt'")
    return frozenset(items)


def check_new_key(spec: KeySpec, label: str, usage: Iterable[str] | str | None) -> frozenset[str]:
    """What every backend checks before generating: spec, label, usage (returned)."""
    if not isinstance(spec, (RSA, EC)):
        raise InvalidInput(f"spec must be RSA(bits) or EC(curve), not {spec!r}")
    if not label or not isinstance(label, str):
        raise InvalidInput("a key needs a non-empty label")
    return normalize_usage(usage, spec)


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
        return self.spec.curve if isinstance(self.spec, EC) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "id": self.id,
            "type": self.key_type,
            "size": self.size,
            "curve": self.curve,
            "usage": sorted(self.usage),
        }


def default_threads() -> int:
    """Default batch parallelism: one worker per core."""
    return max(1, os.cpu_count() or 1)


class Key(abc.ABC):
    """A key inside the HSM. Private material never leaves it."""

    def __init__(self, info: KeyInfo) -> None:
        self.info = info
        self._der: bytes | None = None

    # -- what a backend provides ------------------------------------------------

    @abc.abstractmethod
    def _fetch_public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of this key."""

    @abc.abstractmethod
    def _batch_worker(self, op: Literal["sign", "decrypt"], mech: Mechanism) -> BatchWorker:
        """A context manager yielding a function that does one prepared operation.

        For ``sign`` the function takes :func:`signing_preparer` output and returns
        the signature (ECDSA as raw r‖s); for ``decrypt`` it takes the
        ciphertext and returns the plaintext. Batches enter one worker per
        thread, so a backend can bind a session (or connection) to it.
        """

    def _run_prepared(
        self,
        op: Literal["sign", "decrypt"],
        mech: Mechanism,
        items: Sequence[bytes],
        threads: int,
        return_exceptions: bool,
        *,
        ecdsa_der: bool = False,
    ) -> list[bytes | HSMError]:
        """Run many prepared operations; backends with a faster engine override this.

        With ``ecdsa_der`` the ECDSA signatures come back DER-encoded, else r‖s.
        """
        out = run_batch(lambda: self._batch_worker(op, mech), items, threads, return_exceptions)
        if ecdsa_der:
            return [r if isinstance(r, HSMError) else ecdsa_raw_to_der(r) for r in out]
        return out

    @abc.abstractmethod
    def _delete(self) -> None:
        """Destroy the key (private and public halves) in the HSM."""

    def _default_threads(self) -> int:
        return default_threads()

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

    def upload_json(self, min_bits: int = 2048) -> str:
        """``{"public_key": "<PEM>"}``, refusing keys weaker than ``min_bits``."""
        return export.upload_json(self.public_key_der(), min_bits=min_bits)

    def public_key(self) -> PublicKeyTypes:
        """The public half as a ``cryptography`` key object (for verification)."""
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        return load_der_public_key(self.public_key_der())

    # -- operations ----------------------------------------------------------------

    def _check(self, mechanism: str | Mechanism, *, sign: bool) -> Mechanism:
        mech = parse_mechanism(mechanism, sign=sign)
        check_key_type(mech, self.key_type, self.label)
        return mech

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
        try:
            signature: bytes = self.sign_batch(
                [data], mechanism, prehashed=prehashed, signature_format=signature_format, threads=1
            )[0]
            return signature
        except BatchItemError as exc:
            raise exc.cause from None

    def decrypt(self, ciphertext: bytes, mechanism: str | Mechanism) -> bytes:
        """Decrypt one ciphertext inside the HSM."""
        try:
            plaintext: bytes = self.decrypt_batch([ciphertext], mechanism, threads=1)[0]
            return plaintext
        except BatchItemError as exc:
            raise exc.cause from None

    def _sign_batch(
        self,
        messages: Iterable[bytes],
        mechanism: str | Mechanism,
        prehashed: bool,
        signature_format: str,
        threads: int | None,
        return_exceptions: bool,
    ) -> list[Any]:
        mech = self._check(mechanism, sign=True)
        check_signature_format(signature_format)
        prepare = signing_preparer(mech, prehashed=prehashed)
        prepared: list[bytes | HSMError] = []
        for message in messages:
            try:
                prepared.append(prepare(message))
            except HSMError as exc:
                if not return_exceptions:
                    raise _single_or_batch(exc, len(prepared)) from None
                prepared.append(exc)
        der = mech.family == "ecdsa" and signature_format == "der"
        return self._run_with_input_errors(
            "sign", mech, prepared, threads, return_exceptions, ecdsa_der=der
        )

    def _decrypt_batch(
        self,
        ciphertexts: Iterable[bytes],
        mechanism: str | Mechanism,
        threads: int | None,
        return_exceptions: bool,
    ) -> list[Any]:
        mech = self._check(mechanism, sign=False)
        limit = (self.spec.size + 7) // 8  # an RSA ciphertext is at most the modulus size
        items: list[bytes | HSMError] = []
        for ct in ciphertexts:
            exc: HSMError | None = None
            if not isinstance(ct, (bytes, bytearray, memoryview)):
                exc = InvalidInput(f"ciphertext must be bytes, not {type(ct).__name__}")
            elif len(bytes(ct)) > limit:
                exc = InvalidInput(
                    f"the ciphertext is {len(bytes(ct))} bytes but key {self.label!r} "
                    f"({self.spec}) takes {limit}-byte ciphertexts; was it made for another key?"
                )
            if exc is None:
                items.append(bytes(ct))
            elif not return_exceptions:
                raise _single_or_batch(exc, len(items))
            else:
                items.append(exc)
        return self._run_with_input_errors("decrypt", mech, items, threads, return_exceptions)

    def _run_with_input_errors(
        self,
        op: Literal["sign", "decrypt"],
        mech: Mechanism,
        items: list[bytes | HSMError],
        threads: int | None,
        return_exceptions: bool,
        *,
        ecdsa_der: bool = False,
    ) -> list[bytes | HSMError]:
        """Run the valid items; keep input errors in their places."""
        valid_idx = [i for i, it in enumerate(items) if not isinstance(it, HSMError)]
        valid = [items[i] for i in valid_idx]
        n_threads = max(1, min(threads or self._default_threads(), len(valid) or 1))
        try:
            out = self._run_prepared(
                op,
                mech,
                valid,  # type: ignore[arg-type]
                n_threads,
                return_exceptions,
                ecdsa_der=ecdsa_der,
            )
        except HSMError as exc:
            raise _remap_index(exc, valid_idx, len(items)) from None
        results: list[bytes | HSMError] = list(items)
        for i, r in zip(valid_idx, out, strict=True):
            results[i] = _remap_index(r, valid_idx, len(items)) if isinstance(r, HSMError) else r
        return results

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
        return self._sign_batch(
            messages, mechanism, prehashed, signature_format, threads, return_exceptions
        )

    def decrypt_batch(
        self,
        ciphertexts: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        threads: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Decrypt many ciphertexts in parallel; results in input order (see sign_batch)."""
        return self._decrypt_batch(ciphertexts, mechanism, threads, return_exceptions)

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
        return stream_batches(
            messages,
            lambda chunk: self._sign_batch(
                chunk, mechanism, prehashed, signature_format, threads, return_exceptions
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
    ) -> Iterator[Any]:
        """Stream plaintexts in order, holding at most ``window`` items in flight."""
        self._check(mechanism, sign=False)
        return stream_batches(
            ciphertexts,
            lambda chunk: self._decrypt_batch(chunk, mechanism, threads, return_exceptions),
            _window(window, threads),
        )

    def delete(self) -> None:
        """Destroy the key in the HSM. It cannot be recovered."""
        self._delete()


def _default_window(threads: int | None) -> int:
    return 256 * max(1, threads or default_threads())


def _window(window: int | None, threads: int | None) -> int:
    if window is not None and window < 1:
        raise InvalidInput(f"window must be at least 1 item, got {window!r}")
    return window or _default_window(threads)


def _single_or_batch(exc: HSMError, index: int) -> HSMError:
    return exc if isinstance(exc, BatchItemError) else BatchItemError(index, exc)


def _remap_index(exc: HSMError, valid_idx: list[int], total: int) -> HSMError:
    """Batch errors carry indexes into the valid subset; map them to the caller's."""
    if isinstance(exc, BatchItemError):
        return BatchItemError(valid_idx[exc.index], exc.cause)
    return exc


class HSM(abc.ABC):
    """A connection to one HSM (token or appliance). Use as a context manager."""

    #: short human description used in messages, e.g. ``token 'ci'``.
    description: str = "HSM"

    @abc.abstractmethod
    def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> Key:
        """Generate a key pair inside the HSM: private half non-extractable."""

    @abc.abstractmethod
    def get_key(self, label: str | None = None, *, key_id: str | None = None) -> Key:
        """Exactly one key by label or id; :class:`KeyNotFound` / :class:`AmbiguousKey` else."""

    @abc.abstractmethod
    def list_keys(self) -> list[KeyInfo]:
        """Every key pair the HSM holds that hsmbridge can use."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release sessions or connections. Idempotent."""

    def __enter__(self) -> HSM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
