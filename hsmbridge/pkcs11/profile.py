"""What hsmbridge knows about one token: learned at run time, plus measured module facts.

Learned when the token is opened or first used: whether the module took OS
locking, hands out an instance per ``C_GetFunctionList`` (p11-kit), was
already initialised by someone else; which key templates it accepts
(:class:`~.templates.TemplateQuirks`); which OAEP hashes it really does
(:class:`~.capabilities.Capabilities`).

Two facts cannot be learned safely at run time, so they come from
:data:`MEASURED`, one row per module family, each measured by this
repository's conformance runs (docs/tokens.md):

- whether several sessions really work at the same time (tpm2-pkcs11 takes
  OS locking, yet its issue #843 reports two sessions breaking it). A token
  whose concurrency is unproven gets one session unless ``x-max-sessions``
  or ``max_sessions=`` says otherwise;
- whether the module answers bad padding with CKR_GENERAL_ERROR /
  CKR_FUNCTION_FAILED (SoftHSM2 does). Elsewhere those codes mean "the token
  failed", not "the ciphertext is corrupt";
- whether it enforces CKA_ALLOWED_MECHANISMS as written (tpm2-pkcs11 1.9
  accepts the attribute, then refuses CKM_RSA_PKCS signing the list allows).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .module import LoadedModule
from .templates import TemplateQuirks

log = logging.getLogger("hsmbridge.pkcs11")


@dataclass(frozen=True)
class ModuleFacts:
    """Measured behaviour of one module family (see docs/tokens.md)."""

    name: str
    #: several sessions used at once by several threads work
    concurrent_sessions: bool
    #: bad RSA padding comes back as CKR_GENERAL_ERROR / CKR_FUNCTION_FAILED
    bad_padding_as_general_error: bool
    note: str = ""
    #: keys may carry CKA_ALLOWED_MECHANISMS (tpm2-pkcs11 1.9 then refuses
    #: CKM_RSA_PKCS signing although the list allows it)
    allowed_mechanisms_honoured: bool = True


#: (library manufacturer or None, token manufacturer or None, token model or None) -> facts.
#: Through p11-kit's proxy or client the library is p11-kit's, so rows that also
#: hold behind p11-kit match on the token.
MEASURED: dict[tuple[str | None, str | None, str | None], ModuleFacts] = {
    (None, "SoftHSM project", "SoftHSM v2"): ModuleFacts(
        "SoftHSM2", concurrent_sessions=True, bad_padding_as_general_error=True
    ),
    (None, "IBM Corp.", "IBM SoftTok"): ModuleFacts(
        "opencryptoki software token",
        concurrent_sessions=True,
        bad_padding_as_general_error=True,
        note="bad RSA-OAEP padding comes back as CKR_FUNCTION_FAILED",
    ),
    ("Mozilla Foundation", None, None): ModuleFacts(
        "NSS softokn", concurrent_sessions=True, bad_padding_as_general_error=False
    ),
    ("tpm2-software.github.io", None, None): ModuleFacts(
        "tpm2-pkcs11",
        concurrent_sessions=False,
        bad_padding_as_general_error=False,
        allowed_mechanisms_honoured=False,
        note=(
            "unproven: tpm2-pkcs11 issue #843 reports two sessions breaking it; here 2 and 4 "
            "sessions passed 400 operations each but were slower than one (the TPM is serial)"
        ),
    ),
}

UNKNOWN = ModuleFacts(
    "an unmeasured module", concurrent_sessions=False, bad_padding_as_general_error=False
)


def measured_facts(library_manufacturer: str, token_manufacturer: str, model: str) -> ModuleFacts:
    """The :data:`MEASURED` row for this module and token, or :data:`UNKNOWN`."""
    for (lib, manufacturer, token_model), facts in MEASURED.items():
        if (
            (lib is None or lib == library_manufacturer)
            and (manufacturer is None or manufacturer == token_manufacturer)
            and (token_model is None or token_model == model)
        ):
            return facts
    return UNKNOWN


@dataclass
class TokenProfile:
    """Everything hsmbridge learned or knows about one opened token."""

    module: LoadedModule
    facts: ModuleFacts
    #: sessions hsmbridge opens on the token at most, and why
    max_sessions: int
    max_sessions_reason: str
    templates: TemplateQuirks = field(default_factory=TemplateQuirks)

    def describe(self) -> dict[str, Any]:
        """For ``hsmbridge info``: plain values only."""
        module = self.module
        return {
            "module": module.path,
            **module.info(),
            "module family": self.facts.name,
            "OS locking": "accepted" if module.thread_safe else "refused or unknown (one thread)",
            "instance per C_GetFunctionList": module.instance_per_call,
            "initialised by another library": module.shared,
            "native engine": "on" if module.native_ok and module.thread_safe else "off",
            "concurrent sessions": (
                "measured to work" if self.facts.concurrent_sessions else "unproven or broken"
            )
            + (f" ({self.facts.note})" if self.facts.note else ""),
            "max sessions": f"{self.max_sessions} ({self.max_sessions_reason})",
            "bad padding reported as": (
                "CKR_GENERAL_ERROR (treated as a corrupt ciphertext)"
                if self.facts.bad_padding_as_general_error
                else "its own code (CKR_GENERAL_ERROR means the token failed)"
            ),
            "key templates": self.templates.refused
            or (
                "unrequested usages set false and key separation attributes: accepted"
                if self.templates.learned
                else "not yet learned (no key made in this process)"
            ),
        }


#: per module path: template quirks outlive one handle
_template_quirks: dict[str, TemplateQuirks] = {}


def build_profile(module: LoadedModule, token: Any, requested: int | None) -> TokenProfile:
    """The profile of ``token``; ``requested`` is max_sessions from the caller or URI."""
    library = module.info()["library-manufacturer"]
    facts = measured_facts(library, token.manufacturer_id, token.model)
    default = max(4, 2 * (os.cpu_count() or 1))
    if not module.thread_safe:
        sessions, reason = 1, "the module is not initialised for threads"
    elif requested is not None:
        sessions, reason = requested, "asked for (max_sessions / x-max-sessions)"
        if requested > 1 and not facts.concurrent_sessions:
            log.warning(
                "%s: %d sessions asked for, but concurrent sessions are %s on %s",
                token.label,
                requested,
                facts.note or "unproven",
                facts.name,
            )
    elif facts.concurrent_sessions:
        sessions, reason = default, f"{facts.name}: concurrent sessions measured to work"
    else:
        sessions = 1
        reason = (
            f"{facts.name}: {facts.note or 'concurrency unproven'}; "
            "set x-max-sessions=N in the URI or max_sessions=N to use more"
        )
        log.info("token %r: one session (%s)", token.label, reason)
    quirks = _template_quirks.setdefault(
        module.path, TemplateQuirks(allowed_mechanisms=facts.allowed_mechanisms_honoured)
    )
    return TokenProfile(module, facts, sessions, reason, quirks)
