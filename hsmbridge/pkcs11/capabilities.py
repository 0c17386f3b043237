"""What a token can really do: the mechanisms it lists, corrected by what it refused.

Tokens list one ``CKM_RSA_PKCS_OAEP`` whatever hashes they implement
(SoftHSM2 2.6: SHA-1 only, docs/design.md, fact 6), so the list alone
overpromises. :class:`Capabilities` starts from the list and learns: a
refusal of a mechanism's parameters is recorded (:meth:`record_refusal`), and
the first OAEP refusal probes every other OAEP hash once
(:meth:`probe_oaep`), so a :class:`MechanismNotSupported` names only what works.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pkcs11.exceptions as p11x

from ..errors import MechanismNotSupported
from ..mechanisms import DECRYPT_MECHANISMS, SIGN_MECHANISMS, Mechanism
from . import ec, rsa
from .errormap import translate

#: python-pkcs11 errors that mean "the token does not take these parameters"
REFUSALS = (p11x.ArgumentsBad, p11x.MechanismParamInvalid, p11x.MechanismInvalid)

#: decrypts ``ciphertext`` with ``mech`` in the token, raising python-pkcs11's errors
DecryptProbe = Callable[[Mechanism, bytes], bytes]


def ckm_of(mech: Mechanism) -> Any:
    """The PKCS#11 mechanism (CKM) behind an hsmbridge mechanism."""
    return rsa.mechanism(mech)[0] if mech.key_type == "rsa" else ec.mechanism(mech)[0]


class Capabilities:
    """The hsmbridge mechanisms one token offers; thread-safe."""

    def __init__(self, slot: Any, description: str) -> None:
        self._slot = slot
        self._description = description
        self._listed: list[Mechanism] | None = None
        self._rejected: set[Mechanism] = set()  # listed, but the token refused the parameters
        self._confirmed: set[Mechanism] = set()  # parameters the token has accepted
        self._lock = threading.Lock()

    def offered(self) -> list[Mechanism]:
        """hsmbridge mechanisms the token lists, minus parameters it has refused."""
        if self._listed is None:
            try:
                listed = set(self._slot.get_mechanisms())
            except Exception as exc:
                raise translate(exc, what="listing mechanisms") from None
            self._listed = [
                m for m in (*SIGN_MECHANISMS, *DECRYPT_MECHANISMS) if ckm_of(m) in listed
            ]
        return [m for m in self._listed if m not in self._rejected]

    def require(self, mech: Mechanism) -> None:
        """Raise :class:`MechanismNotSupported` unless the token offers ``mech``."""
        if mech not in self.offered():
            raise self.not_supported(mech)

    def not_supported(self, mech: Mechanism) -> MechanismNotSupported:
        """The error for ``mech``, naming the mechanisms of its kind that work."""
        offered = [m.value for m in self.offered() if m.is_sign == mech.is_sign]
        return MechanismNotSupported(
            f"{self._description} does not support {mech.value}; it offers: "
            + (", ".join(offered) or "nothing of this kind")
        )

    def record_refusal(self, mech: Mechanism) -> MechanismNotSupported:
        """Remember that the token refused ``mech``'s parameters; return the error to raise."""
        with self._lock:
            self._rejected.add(mech)
        return self.not_supported(mech)

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
