"""Explicit attribute templates for keys generated inside the token.

Nothing is left to module defaults: private keys are token objects, private,
sensitive and never extractable, with usage flags exactly as asked. Keys stay
modifiable so the backend can make a session-object copy for the hot path
(CKA_SENSITIVE and CKA_EXTRACTABLE can only ever be tightened, so a copy is
exactly as protected as the original).
"""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute

#: a PKCS#11 attribute template
Template = dict[Attribute, Any]


def key_pair_templates(
    key_id: bytes, label: str, usage: frozenset[str]
) -> tuple[Template, Template]:
    """(public template, private template) for C_GenerateKeyPair."""
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
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    return public, private
