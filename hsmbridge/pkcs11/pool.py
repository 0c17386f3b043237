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

A thread that already holds a worker session and asks for another while the
pool is exhausted gets the one it holds (operations on one session are
sequential anyway): an error path that probes the token while the failing
operation still holds the only session must not wait for itself.

After ``fork()`` the child owns none of the parent's sessions or logins. The
first use in the child initialises the module again
(:func:`~.module.ensure_initialised`), forgets the parent's sessions without
closing them (a network module would close the parent's), and logs in again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import TokenFlag

from ..errors import AuthenticationError, HSMError, HSMUnavailable
from .errormap import SESSION_BROKEN, translate
from .templates import MAPPER

if TYPE_CHECKING:
    from .module import LoadedModule

log = logging.getLogger("hsmbridge.pkcs11")

#: Failures of a token that is busy with another process (SoftHSM2's files
#: while several processes open it at once): worth a brief retry.
TOKEN_BUSY = (p11x.GeneralError, p11x.FunctionFailed, p11x.DeviceError, p11x.DeviceMemory)
CHILD_LOGIN_ATTEMPTS = 6

#: seconds close() waits for operations in flight
CLOSE_TIMEOUT = 30.0


class PooledSession:
    """A worker session plus the key objects already looked up in it."""

    def __init__(self, session: Any) -> None:
        self.session = session
        #: private key handle -> python-pkcs11 object bound to this session
        self.objects: dict[int, Any] = {}
        self.broken = False
        #: the thread that checked it out, and how many more times it did (module doc)
        self.owner: int | None = None
        self.nested = 0

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
_pools: weakref.WeakSet[SessionPool] = weakref.WeakSet()


def _pin_digest(pin: str | None) -> bytes:
    return hashlib.sha256(_PIN_SALT + (pin or "").encode()).digest()


def _after_fork_in_child() -> None:
    """The parent's logins and sessions are not the child's; locks may be held."""
    global _logins_lock
    _logins_lock = threading.Lock()
    _logins.clear()
    for pool in list(_pools):
        pool._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


def sessions_open_on(module_path: str) -> bool:
    """Whether any handle in this process has sessions on the module."""
    return any(pool._login_key[0] == module_path for pool in list(_pools)) or any(
        path == module_path for path, _ in _logins
    )


class SessionPool:
    def __init__(
        self,
        token: pkcs11.Token,
        pin: str | None,
        max_workers: int,
        login_key: tuple[str, int],
        *,
        module: LoadedModule | None = None,
    ) -> None:
        self._token = token
        self._login_key = login_key
        self._module = module
        # Kept to log in again in a forked child; never shown (see __repr__).
        self._pin = pin
        self._pid = os.getpid()
        self._max = max(1, max_workers)
        self._idle: list[PooledSession] = []
        self._open_count = 0
        self._cond = threading.Condition()
        self._admin_lock = threading.RLock()
        self._checked_out: set[PooledSession] = set()
        self._closed = False
        self._generators: list[pkcs11.Session] = []  # idle R/W sessions for generation
        self._login(pin)
        self._admin: pkcs11.Session = self._open_admin()
        _pools.add(self)

    def __repr__(self) -> str:
        return f"<SessionPool {self._login_key[0]!r} slot {self._login_key[1]} max={self._max}>"

    # -- login ----------------------------------------------------------------------

    def _login(self, pin: str | None) -> None:
        """Log in once per token and process; later handles must present the same PIN.

        C_Login cannot check a PIN while the application is logged in, so a
        second handle's PIN is compared with a salted digest of the first. If
        another library in this process logged in to the token already, its
        login is shared (C_Login answers CKR_USER_ALREADY_LOGGED_IN).
        """
        with _logins_lock:
            login = _logins.get(self._login_key)
            if login is None:
                login = _logins[self._login_key] = _Login(self._open_login(pin), _pin_digest(pin))
            elif not hmac.compare_digest(login.pin_digest, _pin_digest(pin)):
                raise AuthenticationError(
                    "the PIN differs from the one this process logged in to the token with; "
                    "check pin-value, pin-source or HSMBRIDGE_PIN"
                )
            login.users += 1

    def _open_login(self, pin: str | None) -> pkcs11.Session:
        try:
            return self._token.open(rw=True, user_pin=pin, attribute_mapper=MAPPER)
        except p11x.UserAlreadyLoggedIn:
            log.info(
                "token in slot %d: this process is already logged in (another library); "
                "sharing that login",
                self._login_key[1],
            )
            return self._open_admin()
        except TOKEN_BUSY as exc:
            raise HSMUnavailable(
                f"logging in to the token failed in the token ({type(exc).__name__}); another "
                "process may be opening it at the same moment: retry"
            ) from None
        except p11x.UserPinNotInitialized:
            if not self._token.flags & TokenFlag.USER_PIN_INITIALIZED:
                raise translate(p11x.UserPinNotInitialized(), what="logging in") from None
            # The token said its PIN is set a moment ago: SoftHSM2 read its token
            # file while another process held it.
            raise HSMUnavailable(
                "the token briefly read as having no user PIN (another process may be "
                "opening it at the same moment): retry"
            ) from None
        except Exception as exc:
            raise translate(exc, what="logging in to the token") from None

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
        except TOKEN_BUSY as exc:
            raise HSMUnavailable(
                f"opening a session failed in the token ({type(exc).__name__}); retry"
            ) from None
        except Exception as exc:
            raise translate(exc, what="opening a session") from None

    # -- fork ------------------------------------------------------------------------

    def _forget_parent(self) -> None:
        """In a forked child, before anything else runs: drop the parent's state."""
        self._cond = threading.Condition()
        self._admin_lock = threading.RLock()
        self._checked_out = set()
        self._idle = []
        self._open_count = 0
        self._generators = []

    def _check_process(self) -> None:
        """In a forked child, initialise the module again and log in again (once)."""
        if self._pid == os.getpid():
            return
        from .module import ensure_initialised, reinitialise_idle

        with self._admin_lock:
            if self._pid == os.getpid():
                return
            pause = 0.05
            for attempt in range(1, CHILD_LOGIN_ATTEMPTS + 1):
                try:
                    if self._module is not None:
                        ensure_initialised(self._module)
                    self._login(self._pin)
                    self._admin = self._open_admin()
                    break
                except AuthenticationError:
                    raise
                except HSMError as exc:
                    # Sibling workers initialise and log in at the same moment; SoftHSM2
                    # then reads a token file mid-write (SlotIDInvalid, no PIN). Read again.
                    if attempt == CHILD_LOGIN_ATTEMPTS or self._module is None:
                        raise
                    log.info("forked child: %s; initialising again (%d)", exc.message, attempt)
                    with _logins_lock:
                        idle = not any(path == self._login_key[0] for path, _ in _logins)
                    if idle:
                        reinitialise_idle(self._module)
                    time.sleep(pause * (1 + random.random() / 2))
                    pause *= 2
            self._pid = os.getpid()
            log.info("forked child %d: new PKCS#11 sessions and login", self._pid)

    @property
    def generation(self) -> int:
        """Changes when sessions and object handles from before are invalid (fork)."""
        self._check_process()
        return self._pid

    # -- sessions ---------------------------------------------------------------------

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
        self._check_process()
        with self._admin_lock:
            if self._closed:
                raise HSMUnavailable("this HSM handle is closed; open a new one")
            try:
                yield self._admin
            except SESSION_BROKEN as exc:
                log.warning("admin session broke (%s); reopening", type(exc).__name__)
                self._reopen_admin()
                raise translate(exc, what="key management") from None

    @contextlib.contextmanager
    def generator(self) -> Iterator[pkcs11.Session]:
        """An R/W session of its own (one per concurrent caller, reused), for key
        generation that needs no search first (one-time keys' pool): a generation
        takes 50-300 ms (docs/design.md, fact 14) and would hold up every short
        admin operation (issuing, deleting) if it ran on the admin session."""
        self._check_process()
        with self._cond:
            if self._closed:
                raise HSMUnavailable("this HSM handle is closed; open a new one")
            session = self._generators.pop() if self._generators else None
        if session is None:
            session = self._open_admin()
        try:
            yield session
        except SESSION_BROKEN as exc:
            with contextlib.suppress(Exception):
                session.close()
            raise translate(exc, what="key generation") from None
        with self._cond:
            if not self._closed:
                self._generators.append(session)
                return
        with contextlib.suppress(Exception):
            session.close()

    def _reopen_admin(self) -> None:
        with contextlib.suppress(Exception):
            self._admin.close()
        try:
            self._admin = self._open_admin()
        except Exception as exc:  # keep the old handle; next call retries
            log.warning("could not reopen the admin session: %s", type(exc).__name__)

    def _check_out(self, pooled: PooledSession) -> PooledSession:
        pooled.owner = threading.get_ident()
        self._checked_out.add(pooled)
        return pooled

    def acquire(self, timeout: float = 30.0) -> PooledSession:
        self._check_process()
        me = threading.get_ident()
        with self._cond:
            while True:
                if self._closed:
                    raise HSMUnavailable("this HSM handle is closed; open a new one")
                if self._idle:
                    return self._check_out(self._idle.pop())
                if self._open_count < self._max:
                    self._open_count += 1
                    break
                mine = [p for p in self._checked_out if p.owner == me]
                if mine:
                    # Exhausted, and this thread holds a session it is not using
                    # right now: it would wait for itself. Hand it out again.
                    mine[0].nested += 1
                    return mine[0]
                if not self._cond.wait(timeout):
                    raise HSMUnavailable(
                        f"no PKCS#11 session became free within {timeout:.0f}s "
                        f"(pool of {self._max}); raise max_sessions or lower concurrency"
                    )
        try:
            pooled = PooledSession(self._token.open())
        except Exception as exc:
            with self._cond:
                self._open_count -= 1
                self._cond.notify()
            raise translate(exc, what="opening a worker session") from None
        with self._cond:
            return self._check_out(pooled)

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
            if pooled.nested:
                pooled.nested -= 1
                return
            pooled.owner = None
            self._checked_out.discard(pooled)
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
        """Up to ``n`` distinct sessions at once (at least one), for a native batch."""
        got = [self.acquire()]
        while len(got) < n:
            with self._cond:
                if not self._idle and self._open_count >= self._max:
                    break
            pooled = self.acquire(timeout=1.0)
            if pooled in got:  # this thread's own, handed out again: not a new one
                self.release(pooled)
                break
            got.append(pooled)
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
            if self._pid == os.getpid() and not self._cond.wait_for(self._all_idle, timeout):
                busy = self._open_count - len(self._idle)
                log.warning("closing with %d PKCS#11 sessions still in use", busy)
            idle, self._idle = self._idle, []
            generators, self._generators = self._generators, []
        _pools.discard(self)
        if self._pid != os.getpid():
            return  # a forked child that never used the pool: nothing of it is ours
        for pooled in idle:
            with contextlib.suppress(Exception):
                pooled.session.close()
        for session in generators:
            with contextlib.suppress(Exception):
                session.close()
        with self._admin_lock, contextlib.suppress(Exception):
            self._admin.close()
        self._logout()
