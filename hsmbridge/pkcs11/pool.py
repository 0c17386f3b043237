"""The sessions of one token: the login session, an admin session, bounded workers.

PKCS#11 login belongs to the application, not the session, and closing a
logged-in session with python-pkcs11 logs every session out (docs/design.md,
fact 2). So:

- the *login session* (one per token and process, shared by every pool on the
  token) is opened R/W with the PIN and only holds the login; the last pool to
  close closes it;
- each pool's *admin session* is R/W without a PIN, serialised, and used for
  key management;
- *worker sessions* are R/O without a PIN, at most ``max_workers`` of them.

Every session but the login session inherits the login. A worker that fails
with a session or device error is closed and forgotten; the next checkout
opens a fresh one. A broken admin session is reopened.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import pkcs11

from ..errors import AuthenticationError, HSMUnavailable
from .errormap import SESSION_BROKEN, translate
from .templates import MAPPER

log = logging.getLogger("hsmbridge.pkcs11")


#: seconds close() waits for operations in flight
CLOSE_TIMEOUT = 30.0


class PooledSession:
    """A worker session plus the key objects already looked up in it."""

    def __init__(self, session: Any) -> None:
        self.session = session
        #: private key handle -> python-pkcs11 object bound to this session
        self.objects: dict[int, Any] = {}
        self.broken = False

    @property
    def handle(self) -> int:
        return int(self.session.handle)


class _Login:
    """The application's login on one token, shared by every pool on it."""

    def __init__(self, session: pkcs11.Session, pin_digest: bytes) -> None:
        self.session = session
        self.pin_digest = pin_digest
        self.users = 0


_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.Lock()
_PIN_SALT = os.urandom(16)


def _pin_digest(pin: str | None) -> bytes:
    return hashlib.sha256(_PIN_SALT + (pin or "").encode()).digest()


class SessionPool:
    def __init__(
        self, token: pkcs11.Token, pin: str | None, max_workers: int, login_key: tuple[str, int]
    ) -> None:
        self._token = token
        self._login_key = login_key
        self._login(pin)
        self._max = max(1, max_workers)
        self._idle: list[PooledSession] = []
        self._open_count = 0
        self._cond = threading.Condition()
        self._admin_lock = threading.RLock()
        self._closed = False
        self._admin: pkcs11.Session = self._open_admin()

    def _login(self, pin: str | None) -> None:
        """Log in once per token and process; later handles must present the same PIN.

        C_Login cannot check a PIN while the application is logged in, so a
        second handle's PIN is compared with a salted digest of the first.
        """
        with _logins_lock:
            login = _logins.get(self._login_key)
            if login is None:
                try:
                    session = self._token.open(rw=True, user_pin=pin, attribute_mapper=MAPPER)
                except Exception as exc:
                    raise translate(exc, what="logging in to the token") from None
                login = _logins[self._login_key] = _Login(session, _pin_digest(pin))
            elif not hmac.compare_digest(login.pin_digest, _pin_digest(pin)):
                raise AuthenticationError(
                    "the PIN differs from the one this process logged in to the token with; "
                    "check pin-value, pin-source or HSMBRIDGE_PIN"
                )
            login.users += 1

    def _logout(self) -> None:
        with _logins_lock:
            login = _logins.get(self._login_key)
            if login is None:
                return
            login.users -= 1
            if login.users == 0:
                del _logins[self._login_key]
                with contextlib.suppress(Exception):
                    login.session.close()  # C_Logout, then close

    def _open_admin(self) -> pkcs11.Session:
        try:
            return self._token.open(rw=True, attribute_mapper=MAPPER)
        except Exception as exc:
            raise translate(exc, what="opening a session") from None

    @property
    def max_workers(self) -> int:
        return self._max

    def counts(self) -> tuple[int, int]:
        """(worker sessions open, of which idle)."""
        with self._cond:
            return self._open_count, len(self._idle)

    @contextlib.contextmanager
    def admin(self) -> Iterator[pkcs11.Session]:
        """The logged-in R/W session, for key management (serialised)."""
        with self._admin_lock:
            if self._closed:
                raise HSMUnavailable("this HSM handle is closed; open a new one")
            try:
                yield self._admin
            except SESSION_BROKEN as exc:
                log.warning("admin session broke (%s); reopening", type(exc).__name__)
                self._reopen_admin()
                raise translate(exc, what="key management") from None

    def _reopen_admin(self) -> None:
        with contextlib.suppress(Exception):
            self._admin.close()
        try:
            self._admin = self._open_admin()
        except Exception as exc:  # keep the old handle; next call retries
            log.warning("could not reopen the admin session: %s", type(exc).__name__)

    def acquire(self, timeout: float = 30.0) -> PooledSession:
        with self._cond:
            while True:
                if self._closed:
                    raise HSMUnavailable("this HSM handle is closed; open a new one")
                if self._idle:
                    return self._idle.pop()
                if self._open_count < self._max:
                    self._open_count += 1
                    break
                if not self._cond.wait(timeout):
                    raise HSMUnavailable(
                        f"no PKCS#11 session became free within {timeout:.0f}s "
                        f"(pool of {self._max}); raise max_sessions or lower concurrency"
                    )
        try:
            return PooledSession(self._token.open())
        except Exception as exc:
            with self._cond:
                self._open_count -= 1
                self._cond.notify()
            raise translate(exc, what="opening a worker session") from None

    def reopen(self, pooled: PooledSession) -> bool:
        """Replace a broken worker session in place; False if no new one opens."""
        with contextlib.suppress(Exception):
            pooled.session.close()
        try:
            pooled.session = self._token.open()
        except Exception:
            return False
        pooled.objects.clear()
        return True

    def release(self, pooled: PooledSession) -> None:
        with self._cond:
            if pooled.broken or self._closed:
                self._open_count -= 1
                with contextlib.suppress(Exception):
                    pooled.session.close()
            else:
                self._idle.append(pooled)
            self._cond.notify_all()  # a waiting acquire, or close() waiting for the last one

    @contextlib.contextmanager
    def session(self) -> Iterator[PooledSession]:
        pooled = self.acquire()
        try:
            yield pooled
        finally:
            self.release(pooled)

    def acquire_many(self, n: int) -> list[PooledSession]:
        """Up to ``n`` sessions at once (at least one), for a native batch."""
        got = [self.acquire()]
        while len(got) < n:
            with self._cond:
                if not self._idle and self._open_count >= self._max:
                    break
            got.append(self.acquire(timeout=1.0))
        return got

    def _all_idle(self) -> bool:
        return self._open_count == len(self._idle)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Refuse new work, wait for operations in flight, then close and log out.

        Operations still running after ``timeout`` seconds fail when their
        sessions close (logged as a warning).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            if not self._cond.wait_for(self._all_idle, timeout):
                busy = self._open_count - len(self._idle)
                log.warning("closing with %d PKCS#11 sessions still in use", busy)
            idle, self._idle = self._idle, []
        for pooled in idle:
            with contextlib.suppress(Exception):
                pooled.session.close()
        with self._admin_lock, contextlib.suppress(Exception):
            self._admin.close()
        self._logout()
