"""Explicit attribute templates for keys generated or imported into the token.

Nothing is left to module defaults. Private keys are token objects, private,
sensitive and never extractable, and the token itself enforces what they are
for: usage flags exactly as asked, ``CKA_ALLOWED_MECHANISMS`` listing only the
mechanisms of that usage (no raw ``CKM_RSA_X_509``, which would turn signing
into decryption), ``CKA_SIGN_RECOVER``/``CKA_UNWRAP``/``CKA_DERIVE`` false,
not copyable (a copy could be made modifiable) and not modifiable (so nobody
with the PIN can switch a sign-only key to decryption). Session-object copies
(docs/design.md, fact 5) are therefore impossible for keys made here; the
speed they bought is given up for key separation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from pkcs11 import Attribute
from pkcs11 import Mechanism as CKM
from pkcs11.attributes import AttributeMapper

#: a PKCS#11 attribute template
Template = dict[Attribute, Any]

_ULONG = struct.Struct("L")  # CK_MECHANISM_TYPE is a CK_ULONG


def _pack_mechanisms(mechanisms: Iterable[int]) -> bytes:
    return b"".join(_ULONG.pack(int(m)) for m in mechanisms)


def _unpack_mechanisms(data: bytes) -> list[int]:
    return [value for (value,) in _ULONG.iter_unpack(data)]


#: python-pkcs11 0.10 cannot pack CKA_ALLOWED_MECHANISMS (an array of
#: CK_MECHANISM_TYPE); sessions that create keys use this mapper, which can.
MAPPER = AttributeMapper()
MAPPER.register_handler(Attribute.ALLOWED_MECHANISMS, _pack_mechanisms, _unpack_mechanisms)


def key_pair_templates(
    key_id: bytes,
    label: str,
    usage: frozenset[str],
    allowed: Iterable[CKM],
    *,
    modifiable: bool = False,
) -> tuple[Template, Template]:
    """(public template, private template) for C_GenerateKeyPair / C_CreateObject.

    ``allowed`` are the PKCS#11 mechanisms the key may be used with.
    ``modifiable=True`` is for keys whose attributes must change later
    (e.g. an end date set at rotation).
    """
    sign = "sign" in usage
    decrypt = "decrypt" in usage
    public = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.VERIFY: sign,
        Attribute.ENCRYPT: decrypt,
        Attribute.WRAP: False,
    }
    private = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.SIGN: sign,
        Attribute.DECRYPT: decrypt,
        Attribute.SIGN_RECOVER: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.ALLOWED_MECHANISMS: sorted(set(allowed)),
        Attribute.COPYABLE: False,
        Attribute.MODIFIABLE: modifiable,
    }
    return public, private
