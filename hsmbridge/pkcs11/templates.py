"""Explicit attribute templates for keys generated or imported into the token.

Nothing is left to module defaults where the module takes it. Private keys are
token objects, private, sensitive and never extractable, and the token itself
enforces what they are for: usage flags exactly as asked,
``CKA_ALLOWED_MECHANISMS`` listing only the mechanisms of that usage (raw
``CKM_RSA_X_509``, the private-key operation itself, only on a key made for raw
decryption alone, which is never made without that list),
``CKA_SIGN_RECOVER``/``CKA_UNWRAP``/``CKA_DERIVE`` false, not copyable (a copy
could be made modifiable) and not modifiable (so nobody with the PIN can switch
a sign-only key to decryption). Session-object copies (docs/design.md, fact 5)
are therefore impossible for keys made here; the speed they bought is given up
for key separation.

Some modules refuse parts of that. tpm2-pkcs11 answers a bare
CKR_GENERAL_ERROR to any usage set false (its TPM object attributes decide
them); a PKCS#11 2.20 module may not know CKA_ALLOWED_MECHANISMS or
CKA_COPYABLE. A refused template is retried with less, one step at a time
(:data:`FALLBACKS`): first the module's defaults for the usages not asked for,
then also without the key-separation attributes. The step a module needed is
remembered per module (later keys start there), logged as a warning, and shown
by ``hsmbridge info``; hsmbridge still enforces the usage asked for on the key
handle it returns. A key for raw decryption is the exception: it is made with
the full template (usages not asked for false, CKA_ALLOWED_MECHANISMS) or not
at all (``needs_allowed``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11.exceptions as p11x
from pkcs11 import Attribute
from pkcs11 import Mechanism as CKM
from pkcs11.attributes import AttributeMapper

from ..errors import HSMError, MechanismNotSupported
from ..mechanisms import RAW_USAGE
from .errormap import translate

log = logging.getLogger("hsmbridge.pkcs11")

T = TypeVar("T")

#: a PKCS#11 attribute template
Template = dict[Attribute, Any]

_ULONG = struct.Struct("L")  # CK_MECHANISM_TYPE is a CK_ULONG


def _pack_mechanisms(mechanisms: Iterable[int]) -> bytes:
    return b"".join(_ULONG.pack(int(m)) for m in mechanisms)


def unpack_mechanisms(data: bytes) -> list[int]:
    return [value for (value,) in _ULONG.iter_unpack(data)]


#: python-pkcs11 0.10 cannot pack CKA_ALLOWED_MECHANISMS (an array of
#: CK_MECHANISM_TYPE); sessions that create keys use this mapper, which can.
MAPPER = AttributeMapper()
MAPPER.register_handler(Attribute.ALLOWED_MECHANISMS, _pack_mechanisms, unpack_mechanisms)

#: Usage attributes of each half, by hsmbridge usage (None: never asked for).
PUBLIC_USAGE: dict[Attribute, str | None] = {
    Attribute.VERIFY: "sign",
    Attribute.ENCRYPT: "decrypt",
    Attribute.WRAP: None,
}
PRIVATE_USAGE: dict[Attribute, str | None] = {
    Attribute.SIGN: "sign",
    Attribute.DECRYPT: "decrypt",
    Attribute.SIGN_RECOVER: None,
    Attribute.UNWRAP: None,
    Attribute.DERIVE: None,
}
#: Key-separation attributes a PKCS#11 2.20 module may not know (CKA_MODIFIABLE
#: false, which every version has, is kept whatever the module refuses).
SEPARATION = (Attribute.ALLOWED_MECHANISMS, Attribute.COPYABLE)

#: The templates tried, in order: (usages not asked for set false, separation
#: attributes). Usages set false matter more than the separation attributes
#: (a key that may decrypt when it should only sign), so they are given up last.
FALLBACKS = ((True, True), (True, False), (False, True), (False, False))

#: What a module answers when it will not take a template as given.
TEMPLATE_REFUSED = (
    p11x.TemplateInconsistent,
    p11x.TemplateIncomplete,
    p11x.AttributeValueInvalid,
    p11x.AttributeTypeInvalid,
    p11x.AttributeReadOnly,
    p11x.GeneralError,
    p11x.FunctionFailed,
)
#: Refusals that are also what a module answers to a passing failure (SoftHSM2,
#: once, to a key generation while other processes wrote to the same token: the
#: CI run that commit 7046fb3 fixed): the same template is tried once more before
#: the module is taken to refuse it, so one transient failure never makes every
#: later key get the module's defaults (tpm2-pkcs11 and NSS refuse templates with
#: CKR_GENERAL_ERROR, docs/tokens.md, and refuse the retry the same way).
AMBIGUOUS_REFUSALS = (p11x.GeneralError, p11x.FunctionFailed)


@dataclass
class TemplateQuirks:
    """What one module was seen to accept in key-pair templates."""

    #: index into FALLBACKS the module needed (0 until a key says otherwise)
    step: int = 0
    #: whether a key has been made yet (with the template of ``step``)
    learned: bool = False
    #: what the module refused, for messages and ``hsmbridge info``
    refused: str | None = None
    #: False where the module mis-enforces CKA_ALLOWED_MECHANISMS (measured:
    #: tpm2-pkcs11 1.9 then refuses CKM_RSA_PKCS signing the list allows)
    allowed_mechanisms: bool = True


def _flag_usages(usage: frozenset[str]) -> frozenset[str]:
    """The usages of the flags: raw decryption is decryption to CKA_DECRYPT (the
    token's CKA_ALLOWED_MECHANISMS tell it apart)."""
    return usage | {"decrypt"} if RAW_USAGE in usage else usage


def _usage_flags(
    table: dict[Attribute, str | None], usage: frozenset[str], explicit_false: bool
) -> dict[Attribute, bool]:
    flags = {attr: use in _flag_usages(usage) for attr, use in table.items()}
    return flags if explicit_false else {attr: True for attr, on in flags.items() if on}


def key_pair_templates(
    key_id: bytes,
    label: str,
    usage: frozenset[str],
    allowed: Iterable[CKM],
    *,
    modifiable: bool = False,
    explicit_false: bool = True,
    separation: bool = True,
    with_allowed: bool = True,
) -> tuple[Template, Template]:
    """(public template, private template) for C_GenerateKeyPair / C_CreateObject.

    ``allowed`` are the PKCS#11 mechanisms the key may be used with.
    ``modifiable=True`` is for keys whose attributes must change later (e.g. an
    end date set at rotation). ``explicit_false=False`` leaves the usages not
    asked for to the module's defaults; ``separation=False`` leaves out
    :data:`SEPARATION` (for modules that refuse them); ``with_allowed=False``
    leaves out CKA_ALLOWED_MECHANISMS alone.
    """
    public = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        **_usage_flags(PUBLIC_USAGE, usage, explicit_false),
    }
    private: Template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        **_usage_flags(PRIVATE_USAGE, usage, explicit_false),
    }
    private[Attribute.MODIFIABLE] = modifiable
    if separation:
        if with_allowed:
            private[Attribute.ALLOWED_MECHANISMS] = sorted(set(allowed))
        private[Attribute.COPYABLE] = False
    return public, private


def _dropped(step: int, usage: frozenset[str]) -> str:
    explicit_false, separation = FALLBACKS[step]
    parts = []
    if not explicit_false:
        unasked = [
            f"CKA_{attr.name}"
            for table in (PUBLIC_USAGE, PRIVATE_USAGE)
            for attr, use in table.items()
            if use not in _flag_usages(usage)
        ]
        parts.append(", ".join(unasked) + " set false")
    if not separation:
        parts.append(", ".join(f"CKA_{attr.name}" for attr in SEPARATION))
    return " and ".join(parts)


def keeps_mechanisms(quirks: TemplateQuirks) -> bool:
    """Whether keys made on this module get the full template, which keeps them to their
    mechanisms (as far as known)."""
    return quirks.allowed_mechanisms and quirks.step == 0


def _no_raw_keys(what: str, why: str) -> MechanismNotSupported:
    return MechanismNotSupported(
        f"{what} failed: a key for raw RSA decryption (rsa-raw) is made only with "
        "CKA_ALLOWED_MECHANISMS [CKM_RSA_X_509], so that the token keeps it to raw "
        f"decryption, and this module {why}; use a token that keeps keys to their mechanisms"
    )


def generate_with_templates(
    generate: Callable[[Template, Template], T],
    key_id: bytes,
    label: str,
    usage: frozenset[str],
    allowed: Iterable[CKM],
    quirks: TemplateQuirks,
    *,
    what: str,
    needs_allowed: bool = False,
) -> T:
    """Call ``generate(public_template, private_template)``, learning ``quirks``.

    Starts at the step the module is known to need; a refused template is
    retried with the next step of :data:`FALLBACKS`, and the step that worked
    is remembered. ``needs_allowed``: only the full template, with
    CKA_ALLOWED_MECHANISMS (a raw-decryption key, which the token must keep to
    raw decryption, with no usage left to the module's defaults).
    """
    allowed = sorted(set(allowed))
    refusals: list[str] = []
    if needs_allowed:  # the full template (step 0) or nothing
        steps = [0] if keeps_mechanisms(quirks) else []
    else:
        steps = list(range(quirks.step, len(FALLBACKS)))
    if not steps:
        raise _no_raw_keys(what, quirks.refused or "mis-enforces that attribute")
    for step in steps:
        explicit_false, separation = FALLBACKS[step]
        templates = key_pair_templates(
            key_id,
            label,
            usage,
            allowed,
            explicit_false=explicit_false,
            separation=separation,
            with_allowed=quirks.allowed_mechanisms,
        )
        try:
            try:
                result = generate(*templates)
            except AMBIGUOUS_REFUSALS:
                result = generate(*templates)
        except TEMPLATE_REFUSED as exc:
            refusals.append(type(exc).__name__)
            if step != steps[-1]:
                continue
            if needs_allowed:
                raise _no_raw_keys(what, f"refused it ({', '.join(refusals)})") from None
            raise HSMError(
                f"{what} failed: the token refused every key template hsmbridge tries "
                f"({', '.join(refusals)}), the last one without "
                f"{_dropped(step, usage)}; check the token's key type, size and usage support"
            ) from None
        except HSMError:
            raise
        except Exception as exc:
            raise translate(exc, what=what) from None
        if step > quirks.step or not quirks.learned:
            if step > 0:
                quirks.refused = (
                    f"refuses key templates with {_dropped(step, usage)} "
                    f"({', '.join(refusals)}); keys get the module's defaults for them"
                )
                log.warning(
                    "the token refused %s (%s); the key was made with the module's defaults "
                    "for them; hsmbridge still enforces usage=%s",
                    _dropped(step, usage),
                    ", ".join(refusals),
                    ",".join(sorted(usage)),
                )
            quirks.step, quirks.learned = step, True
        return result
    raise AssertionError("unreachable")
