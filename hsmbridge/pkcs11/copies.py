"""Session-object copies of token keys, for the hot path.

SoftHSM2 re-checks a token object's files on every use; a copy with
CKA_TOKEN=false skips that (docs/design.md, fact 5; measured: ECDSA P-256 CPU
per signature 77 -> 66 us, RSA unchanged). A copy lives in the logged-in admin
session, has no label or id, is excluded from every search (searches ask for
CKA_TOKEN=true), and is destroyed with its key or when the HSM handle closes.
Modules that refuse the copy keep using the token object.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import pkcs11.exceptions as p11x
from pkcs11 import Attribute

from ..errors import HSMError
from .pool import SessionPool

log = logging.getLogger("hsmbridge.pkcs11")

#: finds a key's private object through a session
ObjectFinder = Callable[[Any], Any]


class SessionCopies:
    """Token key handle -> handle of its session-object copy, made once per key."""

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool
        self._handles: dict[int, int] = {}
        self._objects: dict[int, Any] = {}  # copy handle -> python-pkcs11 object
        self._lock = threading.Lock()

    def handle_for(self, key_handle: int, find: ObjectFinder, label: str) -> int:
        """The copy's handle, made on first use; the token handle if no copy can be made."""
        with self._lock:
            handle = self._handles.get(key_handle)
            if handle is None:
                handle = self._handles[key_handle] = self._make(key_handle, find, label)
            return handle

    def _make(self, key_handle: int, find: ObjectFinder, label: str) -> int:
        try:
            with self._pool.admin() as session:
                copy = find(session).copy(
                    {Attribute.TOKEN: False, Attribute.LABEL: "", Attribute.ID: b""}
                )
                self._objects[int(copy.handle)] = copy
                return int(copy.handle)
        except (p11x.PKCS11Error, HSMError) as exc:
            log.info("no session copy of key %r (%s); using the token object", label, exc)
            return key_handle

    def drop(self, key_handle: int) -> None:
        """Destroy the copy of a key (before the key itself is destroyed)."""
        with self._lock:
            handle = self._handles.pop(key_handle, None)
            copy = self._objects.pop(handle, None) if handle is not None else None
        if copy is not None:
            with contextlib.suppress(Exception), self._pool.admin():
                copy.destroy()

    def close(self) -> None:
        """Destroy every copy (the handle is closing)."""
        with self._lock:
            copies = list(self._objects.values())
            self._handles.clear()
            self._objects.clear()
        for copy in copies:
            with contextlib.suppress(Exception), self._pool.admin():
                copy.destroy()
