"""What a token can really do: the mechanisms it lists, corrected by what it refused.

Tokens list one ``CKM_RSA_PKCS_OAEP`` whatever hashes they implement
(SoftHSM2 2.6: SHA-1 only, docs/design.md, fact 6), so the list alone
overpromises. :class:`Capabilities` starts from the list and learns: a
refusal of a mechanism's parameters is recorded (:meth:`record_refusal`), and
the first OAEP refusal probes every other OAEP hash once
(:meth:`probe_oaep`), so a :class:`MechanismNotSupported` names only what works.

Before anything is offered, the OAEP hashes are probed once up front where that
is cheap (:meth:`probe_oaep_by_encryption`): a session public-key object made
from a key generated here encrypts a random value with each hash in the token,
and the private half (here, not in the token) must decrypt it. No token key and
no private operation in the token are needed. A token that cannot do that gives
no verdict, and the decrypt-time probe still applies.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pkcs11.exceptions as p11x

from ..errors import HSMError, MechanismNotSupported
from ..mechanisms import DECRYPT_MECHANISMS, SIGN_MECHANISMS, Mechanism
from . import ec, rsa
from .errormap import translate

log = logging.getLogger("hsmbridge.pkcs11")

#: python-pkcs11 errors that mean "the token does not take these parameters"
REFUSALS = (p11x.ArgumentsBad, p11x.MechanismParamInvalid, p11x.MechanismInvalid)

#: decrypts ``ciphertext`` with ``mech`` in the token, raising python-pkcs11's errors
DecryptProbe = Callable[[Mechanism, bytes], bytes]
#: a context manager giving a session to probe in
SessionSource = Callable[[], AbstractContextManager[Any]]

_probe_key: Any = None  # an RSA-2048 key (cryptography), made once per process
_probe_key_lock = threading.Lock()


def _probe_private_key() -> Any:
    global _probe_key
    with _probe_key_lock:
        if _probe_key is None:
            from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

            _probe_key = crypto_rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return _probe_key


def ckm_of(mech: Mechanism) -> Any:
    """The PKCS#11 mechanism (CKM) behind an hsmbridge mechanism."""
    return rsa.mechanism(mech)[0] if mech.key_type == "rsa" else ec.mechanism(mech)[0]


class Capabilities:
    """The hsmbridge mechanisms one token offers; thread-safe."""

    def __init__(
        self, slot: Any, description: str, probe_session: SessionSource | None = None
    ) -> None:
        self._slot = slot
        self._description = description
        self._probe_session = probe_session
        self._listed: list[Mechanism] | None = None
        self._rejected: set[Mechanism] = set()  # listed, but the token refused the parameters
        self._confirmed: set[Mechanism] = set()  # parameters the token has accepted
        self._lock = threading.Lock()
        self._list_lock = threading.Lock()

    def offered(self) -> list[Mechanism]:
        """hsmbridge mechanisms the token lists, minus parameters it has refused."""
        if self._listed is None:
            with self._list_lock:
                self._list()
        return [m for m in self._listed or [] if m not in self._rejected]

    def _list(self) -> None:
        if self._listed is None:
            try:
                listed = set(self._slot.get_mechanisms())
            except Exception as exc:
                raise translate(exc, what="listing mechanisms") from None
            offered = [m for m in (*SIGN_MECHANISMS, *DECRYPT_MECHANISMS) if ckm_of(m) in listed]
            if self._probe_session is not None and any(m.family == "oaep" for m in offered):
                self.probe_oaep_by_encryption(self._probe_session)
            self._listed = offered

    def require(self, mech: Mechanism) -> None:
        """Raise :class:`MechanismNotSupported` unless the token offers ``mech``."""
        if mech not in self.offered():
            raise self.not_supported(mech)

    def not_supported(self, mech: Mechanism) -> MechanismNotSupported:
        """The error for ``mech``, naming the mechanisms of its kind (usage) that work."""
        offered = [m.value for m in self.offered() if m.usage == mech.usage]
        return MechanismNotSupported(
            f"{self._description} does not support {mech.value}; it offers: "
            + (", ".join(offered) or "nothing of this kind")
        )

    def record_refusal(self, mech: Mechanism) -> MechanismNotSupported:
        """Remember that the token refused ``mech``'s parameters; return the error to raise."""
        self._reject(mech)
        return self.not_supported(mech)

    def _reject(self, mech: Mechanism) -> None:
        with self._lock:
            self._rejected.add(mech)

    def probe_oaep(self, public_key: Any, decrypt: DecryptProbe) -> None:
        """Try every OAEP hash not yet judged, once, with a random value.

        ``public_key`` is the key's ``cryptography`` RSA public key; ``decrypt``
        runs the token's decryption. A hash the key is too small for gets no
        verdict; an error that is not about the mechanism gets none either.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        for mech in DECRYPT_MECHANISMS:
            if mech.family != "oaep" or mech in self._rejected or mech in self._confirmed:
                continue
            assert mech.hash_name is not None
            algorithm = getattr(hashes, mech.hash_name.upper())()
            probe = os.urandom(16)
            try:
                ciphertext = public_key.encrypt(
                    probe, padding.OAEP(padding.MGF1(algorithm), algorithm, None)
                )
            except ValueError:
                continue  # the key is too small for this hash
            try:
                out = decrypt(mech, ciphertext)
            except REFUSALS:
                self.record_refusal(mech)
                continue
            except p11x.PKCS11Error:
                continue
            if out == probe:
                with self._lock:
                    self._confirmed.add(mech)

    def probe_oaep_by_encryption(self, session: SessionSource) -> None:
        """Judge every OAEP hash once by encrypting in the token (see the module doc)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        from pkcs11 import Attribute, KeyType, ObjectClass

        key = _probe_private_key()
        numbers = key.public_key().public_numbers()
        template = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.ENCRYPT: True,
            Attribute.MODULUS: numbers.n.to_bytes(256, "big"),
            Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes(3, "big"),
        }
        try:
            with session() as pooled:
                public = pooled.session.create_object(template)
                try:
                    for mech in DECRYPT_MECHANISMS:
                        if mech.family != "oaep":
                            continue
                        ckm, param = rsa.mechanism(mech)
                        probe = os.urandom(16)
                        try:
                            ciphertext = bytes(
                                public.encrypt(probe, mechanism=ckm, mechanism_param=param)
                            )
                        except REFUSALS:
                            self._reject(mech)
                            continue
                        assert mech.hash_name is not None
                        algorithm = getattr(hashes, mech.hash_name.upper())()
                        oaep = padding.OAEP(padding.MGF1(algorithm), algorithm, None)
                        try:
                            ok = key.decrypt(ciphertext, oaep) == probe
                        except ValueError:
                            ok = False  # the token used other parameters than asked
                        if ok:
                            with self._lock:
                                self._confirmed.add(mech)
                        else:
                            self._reject(mech)
                finally:
                    public.destroy()
        except (p11x.PKCS11Error, HSMError) as exc:
            log.debug(
                "%s: no up-front OAEP probe (%s); hashes are judged on first use",
                self._description,
                type(exc).__name__,
            )
