"""Opening a token, retried briefly while it is busy.

Several processes opening one token at the same moment (workers of a service
starting together) can find it busy: SoftHSM2 reads and locks its token files
then, and answers CKR_GENERAL_ERROR to a login now and then. Such failures are
:class:`~hsmbridge.errors.HSMUnavailable`; opening retries them for about two
seconds with jittered pauses before giving up. Nothing else is retried: a
wrong PIN must not be tried again (tokens lock after a few failures). Between
attempts the module is initialised again if no handle in this process has
sessions on it, since SoftHSM2 reads its token files only at C_Initialize.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import pkcs11.exceptions as p11x

from ..errors import HSMUnavailable, TokenNotFound
from ..uri import Pkcs11URI
from .backend import Pkcs11HSM
from .errormap import translate
from .module import load_module, reinitialise_idle
from .pool import sessions_open_on

log = logging.getLogger("hsmbridge.pkcs11")

OPEN_ATTEMPTS = 6
TOKEN_LOOKS = 3  # extra looks for a token not found, when the module can read again
FIRST_PAUSE = 0.05  # seconds, doubled after each attempt, with up to 50% jitter


def _read_tokens_again(uri: Pkcs11URI) -> bool:
    """Let the module read its tokens again, if nothing in this process uses it."""
    module = load_module(uri.module_path, name=uri.module_name, init_reserved=uri.init_reserved)
    return not sessions_open_on(module.path) and reinitialise_idle(module)


def open_pkcs11(uri: Pkcs11URI, **options: Any) -> Pkcs11HSM:
    """:class:`Pkcs11HSM` for ``uri``; busy-token failures are retried briefly."""
    pause = FIRST_PAUSE
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            return Pkcs11HSM(uri, **options)
        except HSMUnavailable as exc:
            if attempt == OPEN_ATTEMPTS:
                raise HSMUnavailable(
                    f"{exc.message} (tried {OPEN_ATTEMPTS} times over about "
                    f"{FIRST_PAUSE * (2**OPEN_ATTEMPTS):.0f}s)"
                ) from None
            log.info("opening the token: %s; retrying (%d)", exc.message, attempt)
            _read_tokens_again(uri)
        except TokenNotFound:
            # SoftHSM2 shows a token whose file it read mid-write as uninitialised
            # until it reads it again: one or two looks, only if that is cheap.
            if attempt > TOKEN_LOOKS or not _read_tokens_again(uri):
                raise
            log.info("opening the token: not found; reading the tokens again (%d)", attempt)
        except p11x.PKCS11Error as exc:  # anything python-pkcs11 raises on the way
            raise translate(exc, what="opening the token") from None
        time.sleep(pause * (1 + random.random() / 2))
        pause *= 2
    raise AssertionError("unreachable")
