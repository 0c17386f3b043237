"""Choosing the module's slot and token from an RFC 7512 URI.

``library-*`` must match the module's CK_INFO, ``slot-*`` the slot's
CK_SLOT_INFO and ``token``/``manufacturer``/``serial``/``model`` the token's
CK_TOKEN_INFO. A token that several processes open at the same moment may
briefly read as absent or fail (SoftHSM2 reads its token files then); those
failures are :class:`HSMUnavailable`, which :func:`hsmbridge.open` retries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pkcs11.exceptions as p11x
from pkcs11 import TokenFlag

from ..errors import HSMUnavailable, ModuleLoadError, TokenNotFound
from ..uri import Pkcs11URI
from .errormap import translate
from .module import LoadedModule
from .pool import TOKEN_BUSY

log = logging.getLogger("hsmbridge.pkcs11")


def check_library(module: LoadedModule, uri: Pkcs11URI) -> None:
    """The URI's library-manufacturer/-description/-version against the module's CK_INFO."""
    info = module.info()
    wanted = {
        "library-manufacturer": uri.library_manufacturer,
        "library-description": uri.library_description,
        "library-version": (
            f"{uri.library_version[0]}.{uri.library_version[1]}" if uri.library_version else None
        ),
    }
    for name, value in wanted.items():
        if value is not None and info[name] != value:
            raise ModuleLoadError(
                f"{module.description} reports {name} {info[name]!r}, the URI asks for "
                f"{value!r}; fix the URI or point module-path/module-name at the right module"
            )


def _slot_matches(slot: Any, uri: Pkcs11URI) -> bool:
    return (
        (uri.slot_id is None or slot.slot_id == uri.slot_id)
        and (uri.slot_description is None or slot.slot_description == uri.slot_description)
        and (uri.slot_manufacturer is None or slot.manufacturer_id == uri.slot_manufacturer)
    )


def _token_matches(token: Any, uri: Pkcs11URI) -> bool:
    serial = token.serial.decode(errors="replace").strip()
    return (
        (uri.token is None or token.label == uri.token)
        and (uri.serial is None or serial == uri.serial)
        and (uri.manufacturer is None or token.manufacturer_id == uri.manufacturer)
        and (uri.model is None or token.model == uri.model)
    )


#: Attempts at reading the token list while it reads as busy or empty.
LIST_ATTEMPTS = 5
LIST_PAUSE = 0.1


def _initialised_tokens(module: LoadedModule) -> tuple[list[tuple[Any, Any]], bool]:
    """(slot, token) pairs of initialised tokens, and whether any slot has a token."""
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            candidates = [
                (slot, slot.get_token()) for slot in module.lib.get_slots(token_present=True)
            ]
        except (p11x.TokenNotPresent, p11x.TokenNotRecognised, *TOKEN_BUSY) as exc:
            if attempt == LIST_ATTEMPTS:
                raise HSMUnavailable(
                    f"listing the tokens of {module.description} failed ({type(exc).__name__}) "
                    f"{LIST_ATTEMPTS} times; another process may be changing them: retry"
                ) from None
        except Exception as exc:
            raise translate(exc, what="listing slots") from None
        else:
            initialised = [(s, t) for s, t in candidates if t.flags & TokenFlag.TOKEN_INITIALIZED]
            # Slots that answer with no initialised token: SoftHSM2 while another
            # process writes its token files. Look again briefly before giving up.
            if initialised or not candidates or attempt == LIST_ATTEMPTS:
                return initialised, bool(candidates)
        log.debug("token list of %s busy or empty; reading it again", module.description)
        time.sleep(LIST_PAUSE * attempt)
    raise AssertionError("unreachable")


def select_token(module: LoadedModule, uri: Pkcs11URI) -> Any:
    """The one initialised token the URI names (python-pkcs11 Token)."""
    check_library(module, uri)
    initialised, _ = _initialised_tokens(module)
    matches = [t for s, t in initialised if _slot_matches(s, uri) and _token_matches(t, uri)]
    if not matches:
        present = ", ".join(repr(t.label) for _, t in initialised) or "none"
        raise TokenNotFound(
            f"no {uri.describe()} in {module.description}; tokens present: {present}. "
            "Fix token=/serial=/slot-id= in the URI (for SoftHSM2, check SOFTHSM2_CONF)"
        )
    if len(matches) > 1:
        raise TokenNotFound(
            f"{len(matches)} tokens match {uri.describe()}; add serial= or slot-id= to the URI"
        )
    return matches[0]
