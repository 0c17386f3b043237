"""AES keys in the token: generated there (CKM_AES_KEY_GEN), used with CKM_AES_CBC.

Templates are explicit, as for key pairs: a token object, private, sensitive,
never extractable, encrypt and decrypt only (no wrap, unwrap, derive).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from ..api import AES_BITS, SecretKey
from ..errors import HSMError, InvalidInput, KeyExists, KeyNotFound
from .errormap import translate

if TYPE_CHECKING:
    from .backend import Pkcs11HSM


class Pkcs11SecretKey(SecretKey):
    def __init__(self, hsm: Pkcs11HSM, label: str, key_id: str, bits: int) -> None:
        super().__init__(label, key_id, bits)
        self.hsm = hsm

    def _object_in(self, session: Any) -> Any:
        found = _find(session, bytes.fromhex(self.id))
        if not found:
            raise KeyNotFound(f"AES key {self.label!r} is gone from {self.hsm.description}")
        return found[0]

    def _cbc(self, encrypt: bool, data: bytes, iv: bytes) -> bytes:
        with self.hsm.pool.session() as pooled:
            try:
                key = self._object_in(pooled.session)
                if encrypt:
                    return bytes(key.encrypt(data, mechanism=Mechanism.AES_CBC, mechanism_param=iv))
                return bytes(key.decrypt(data, mechanism=Mechanism.AES_CBC, mechanism_param=iv))
            except HSMError:
                raise
            except Exception as exc:
                what = "AES-CBC encryption" if encrypt else "AES-CBC decryption"
                raise translate(exc, what=what, key=self.label) from None

    def delete(self) -> None:
        with self.hsm.pool.admin() as session:
            try:
                self._object_in(session).destroy()
            except HSMError:
                raise
            except Exception as exc:
                raise translate(exc, what="deleting the AES key", key=self.label) from None


def _find(session: Any, raw_id: bytes) -> list[Any]:
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: True,
        Attribute.ID: raw_id,
    }
    return list(session.get_objects(template))


def _raw_id(key_id: str | None) -> bytes:
    try:
        return bytes.fromhex(key_id) if key_id else os.urandom(16)
    except (ValueError, TypeError):
        raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None


def generate(hsm: Pkcs11HSM, bits: int, label: str, key_id: str | None) -> Pkcs11SecretKey:
    if bits not in AES_BITS:
        raise InvalidInput(f"AES keys are {', '.join(map(str, AES_BITS))} bits, not {bits!r}")
    if not isinstance(label, str) or not label:
        raise InvalidInput("an AES key needs a non-empty label")
    raw_id = _raw_id(key_id)
    template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ID: raw_id,
        Attribute.LABEL: label,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    with hsm.pool.admin() as session:
        try:
            if _find(session, raw_id):
                raise KeyExists(
                    f"a key with id {raw_id.hex()!r} already exists in {hsm.description}"
                )
            session.generate_key(KeyType.AES, bits, store=True, template=template)
        except HSMError:
            raise
        except Exception as exc:
            raise translate(exc, what=f"generating an AES-{bits} key", key=label) from None
    return Pkcs11SecretKey(hsm, label, raw_id.hex(), bits)


def get(hsm: Pkcs11HSM, key_id: str) -> Pkcs11SecretKey:
    with hsm.pool.admin() as session:
        try:
            found = _find(session, _raw_id(key_id))
            if not found:
                raise KeyNotFound(f"no AES key with id {key_id!r} in {hsm.description}")
            obj = found[0]
            label = str(obj[Attribute.LABEL] or "")
            bits = int(obj[Attribute.VALUE_LEN]) * 8
        except HSMError:
            raise
        except Exception as exc:
            raise translate(exc, what="looking up an AES key") from None
    return Pkcs11SecretKey(hsm, label, key_id, bits)
