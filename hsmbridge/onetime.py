"""One-time keys: an RSA key per checkout, issued from a pool in the HSM, decrypting once.

``hsm.one_time_keys(RSA(2048), ttl=timedelta(minutes=15), pool=16, signer=ring)``
keeps ``pool`` key pairs pre-generated in the HSM (a background thread refills
it: RSA generation takes 50-300 ms on SoftHSM2, docs/design.md fact 14).
:meth:`OneTimeKeys.issue` hands one out with its JWK and a *context*: a JWT
signed by ``signer`` carrying the JWK and the expiry (the Flex v2 flow, fact
16). The key decrypts once, in any process sharing the HSM, until it expires;
then it is destroyed in the HSM.

Everything that must survive a process is in the HSM, behind
:class:`OneTimeStore` (``hsmbridge.pkcs11.otkstore``: token objects;
``hsmbridge.nethsm.otkstore``: key IDs and certificates). The protocol
(docs/design.md, "One-time keys"):

- *pool*: a pool key is issued only by the process that generated it (only
  its memory says the key is in its pool), so two processes cannot hand out
  the same key and ``issue()`` needs no claim and no search. A pool key
  carries the instant it was pooled; a process retires its own after
  :data:`POOL_RETIRE` and a sweep anywhere destroys never-issued pool keys
  older than :data:`POOL_ORPHANED` (left by a process that died);
- *issue*: an immutable record of the kid's ``expires_at``, written before
  the key is handed out (on PKCS#11 the key's ticket was written when it was
  pooled): a process killed before never handed the key out; after, the key
  decrypts until its expiry, in any process;
- *decrypt*: one atomic claim before the HSM is asked, which at most one
  process wins however many race (PKCS#11: destroying the key's ticket
  object; NetHSM: generating the key ID ``otk.NAME.KID.used``). A claim is never
  undone, so a second decrypt fails even before the key is destroyed, and a
  process killed after claiming leaves a key nobody decrypts again. The key
  is destroyed right after the decrypt (attempted: a failed decrypt uses the
  key up too, so a one-time key is no oracle);
- *sweep*: destroys expired keys (key, then claim, then the issued record)
  and the keys of claims whose process died before destroying them.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .api import RSA, Key, KeySpec, Validity
from .errors import (
    HSMError,
    InvalidInput,
    KeyExpired,
    KeyNotFound,
    MechanismNotSupported,
    PoolExhausted,
)
from .mechanisms import Mechanism, parse_mechanism
from .rings import from_instant, to_instant

if TYPE_CHECKING:
    from .api import HSM

log = logging.getLogger("hsmbridge.onetime")

__all__ = ["OneTimeKey", "OneTimeKeys", "OneTimeStore", "PoolKey", "StoredKey"]

#: pool names are parts of PKCS#11 labels and NetHSM key IDs
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,31}")
#: a kid is 16 random bytes in hex: it names the key in the HSM directly (no search by
#: thumbprint), and 128 bits cannot collide
KID_RE = re.compile(r"[0-9a-f]{32}")
#: JWE ``alg`` a one-time key may be configured for -> the mechanism that unwraps
ALGS: dict[str, Mechanism] = {
    "RSA-OAEP": Mechanism.RSA_OAEP_SHA1,
    "RSA-OAEP-256": Mechanism.RSA_OAEP_SHA256,
    "RSA-OAEP-384": Mechanism.RSA_OAEP_SHA384,
    "RSA-OAEP-512": Mechanism.RSA_OAEP_SHA512,
}
#: a process destroys and replaces its own never-issued pool keys this old (seconds)
POOL_RETIRE = 12 * 3600
#: a sweep destroys never-issued pool keys this old: their process died (seconds);
#: twice :data:`POOL_RETIRE`, so a live process's pool key is never swept
POOL_ORPHANED = 2 * POOL_RETIRE
#: a decrypt claim this old whose key still exists was left by a process that died
#: midway (seconds): a sweep destroys the key
STALE_CLAIM = 300.0
#: kids swept by this handle it still names as such in messages (then KeyNotFound)
REMEMBERED = 100_000
#: a one-time key lives at most this long (NetHSM labels and records hold seconds)
MAX_TTL = timedelta(days=7)


@dataclass(frozen=True)
class OneTimeKey:
    """An issued one-time key: give ``jwk`` (or ``context``) to the party that encrypts."""

    kid: str
    #: the public key as a JWK: ``kid``, ``use: enc``, ``alg`` as configured
    jwk: dict[str, str]
    expires_at: datetime
    #: a JWT signed by the pool's signer: ``{"iat", "exp", "jti": kid, "jwk": jwk}``
    #: (None without a signer)
    context: str | None


@dataclass(frozen=True)
class PoolKey:
    """A never-issued key in the HSM, as a sweep sees it."""

    kid: str
    #: when it was pooled (Unix seconds, the handle's clock)
    pooled: int


@dataclass(frozen=True)
class StoredKey:
    """What the HSM holds about one issued kid (the key may already be destroyed)."""

    kid: str
    expires_at: int
    #: the key pair is still in the HSM
    has_key: bool
    #: decrypt claims on it (0 = never used), and whether every claimant is gone
    claims: int = 0
    claims_abandoned: bool = False


class OneTimeStore(abc.ABC):
    """How a backend keeps one-time keys in the HSM (see the module doc for the protocol).

    ``name`` is the pool's name; ``kid`` 32 hex digits. Every record is
    written once and never changed.
    """

    @abc.abstractmethod
    def generate(self, name: str, kid: str, spec: RSA, pooled: int, mechanism: Mechanism) -> Key:
        """A decrypt-only key pair for the pool, named by ``kid``, pooled at ``pooled``,
        that decrypts with ``mechanism`` (:class:`MechanismNotSupported` if the HSM
        gave it less)."""

    @abc.abstractmethod
    def mark_issued(self, name: str, key: Key, expires_at: int) -> None:
        """Record, atomically, that ``key`` was handed out until ``expires_at``."""

    @abc.abstractmethod
    def issued(self, name: str, kid: str) -> int | None:
        """The ``expires_at`` of an issued kid; None if it was never issued (or swept)."""

    @abc.abstractmethod
    def claim(self, name: str, kid: str, expires_at: int) -> float | None:
        """Claim issued ``kid``'s one decrypt, atomically across processes. None when
        this process won it; else when (Unix time, 0 if unknown) another claimed it."""

    @abc.abstractmethod
    def key(self, name: str, kid: str) -> Key:
        """The issued key (:class:`KeyNotFound` once destroyed)."""

    @abc.abstractmethod
    def destroy_key(self, name: str, kid: str) -> None:
        """Destroy the key pair (records stay: the kid stays known as used); idempotent."""

    @abc.abstractmethod
    def forget(self, name: str, kid: str) -> None:
        """After expiry: destroy the key if left, then the claims, then the issued record."""

    @abc.abstractmethod
    def discard(self, key: Key) -> None:
        """Destroy a never-issued pool key."""

    @abc.abstractmethod
    def contents(self, name: str) -> tuple[list[PoolKey], list[StoredKey]]:
        """Every never-issued pool key and every issued kid of pool ``name`` (for sweeps)."""


@dataclass
class _Pooled:
    key: Key
    kid: str
    jwk: dict[str, str]
    pooled: int  # the handle's clock, Unix seconds


@dataclass
class _Counters:
    issued: int = 0
    decrypted: int = 0
    expired: int = 0
    refused: int = 0
    generated: int = 0
    generate_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=64))


class OneTimeKeys:
    """A pool of one-time decryption keys in one HSM (``hsm.one_time_keys(...)``).

    Use as a context manager, or call :meth:`close`: it stops the refiller and
    destroys the pool keys never issued (issued ones decrypt until they expire).
    """

    def __init__(
        self,
        hsm: HSM,
        spec: KeySpec,
        *,
        ttl: timedelta = timedelta(minutes=15),
        pool: int = 16,
        signer: Any = None,
        alg: str | None = None,
        name: str = "otk",
        refill_threads: int = 1,
        wait: timedelta = timedelta(seconds=5),
        context_alg: str | None = None,
    ) -> None:
        from . import jose

        if not isinstance(spec, RSA):
            raise InvalidInput(
                f"one-time keys decrypt, so they are RSA keys; got {spec!r}, use RSA(2048)"
            )
        if not isinstance(ttl, timedelta) or not timedelta(seconds=1) <= ttl <= MAX_TTL:
            raise InvalidInput(
                f"ttl must be a datetime.timedelta from 1 second to {MAX_TTL.days} days, "
                f"got {ttl!r}; e.g. ttl=timedelta(minutes=15)"
            )
        for what, value, least in (("pool", pool, 1), ("refill_threads", refill_threads, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidInput(f"{what} must be a whole number >= {least}, got {value!r}")
        if not isinstance(wait, timedelta) or wait < timedelta(0):
            raise InvalidInput(f"wait must be a datetime.timedelta of zero or more, got {wait!r}")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidInput(
                f"one-time key pool name {name!r} is invalid: 1-32 letters, digits, '_' and "
                "'-', starting with a letter or digit"
            )
        self.hsm = hsm
        self.spec = spec
        self.ttl = ttl
        self.name = name
        self.alg, self.mechanism = self._choose_alg(alg)
        self.signer = signer
        self.context_alg = (context_alg or jose.jws_alg_for(signer)) if signer is not None else None
        self._store = hsm.one_time_store()
        self._target = pool
        self._threads = refill_threads
        self._wait = wait.total_seconds()
        self._pool: deque[_Pooled] = deque()
        self._issued: dict[str, tuple[Key, int]] = {}  # kid -> key, expires_at (this process)
        # kid -> expires_at, for messages: decrypted here (until expiry), swept here (the
        # last REMEMBERED); the HSM's records say the same, these spare a lookup
        self._used: dict[str, int] = {}
        self._swept: dict[str, int] = {}
        self._counters = _Counters()
        self._cond = threading.Condition()
        self._closed = False
        self._refill_error: HSMError | None = None
        self._refillers = [
            threading.Thread(target=self._refill, name=f"otk-refill-{name}-{i}", daemon=True)
            for i in range(refill_threads)
        ]
        for thread in self._refillers:
            thread.start()

    def _offered(self) -> set[Mechanism]:
        """What the HSM can decrypt with, said in advance; a backend that learns it on use
        (NetHSM: every OAEP hash, docs/design.md fact 6) is taken at its word."""
        listed = self.hsm.supported_mechanisms()
        return set(Mechanism) if listed is None else set(listed)

    def _choose_alg(self, alg: str | None) -> tuple[str, Mechanism]:
        """The JWE ``alg`` keys are issued for; RSA-OAEP-256 only where the HSM has it."""
        offered = self._offered()
        if alg is None:
            if Mechanism.RSA_OAEP_SHA256 in offered:
                return "RSA-OAEP-256", Mechanism.RSA_OAEP_SHA256
            raise MechanismNotSupported(
                f"{self.hsm.description} cannot decrypt RSA-OAEP-256 (OAEP with SHA-256), the "
                "default for one-time keys; pass alg='RSA-OAEP' (OAEP with SHA-1) to issue keys "
                "for that, if the party encrypting accepts it"
            )
        if alg not in ALGS:
            raise InvalidInput(f"alg must be one of {', '.join(ALGS)}, got {alg!r}")
        if ALGS[alg] not in offered:
            usable = [a for a, m in ALGS.items() if m in offered]
            raise MechanismNotSupported(
                f"{self.hsm.description} cannot decrypt {alg} ({ALGS[alg].value}); it can do "
                f"{', '.join(usable) or 'no RSA-OAEP'}: pass one of those as alg="
            )
        return alg, ALGS[alg]

    def __repr__(self) -> str:
        return f"<OneTimeKeys {self.name!r} {self.spec} {self.alg} in {self.hsm.description}>"

    def __enter__(self) -> OneTimeKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pool ---------------------------------------------------------------------------

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._pool) >= self._target:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                pooled = self._generate()
            except HSMError as exc:
                log.warning("refilling one-time key pool %r failed: %s", self.name, exc)
                with self._cond:
                    self._refill_error = exc
                    self._cond.notify_all()
                    self._cond.wait(1.0)  # do not spin on a broken HSM
                continue
            with self._cond:
                if self._closed:
                    with contextlib.suppress(HSMError):
                        self._store.discard(pooled.key)
                    return
                self._pool.append(pooled)
                self._refill_error = None
                self._cond.notify_all()

    def _generate(self) -> _Pooled:
        kid = uuid.uuid4().hex
        started = time.perf_counter()
        now = to_instant(self.hsm.clock())
        key = self._store.generate(self.name, kid, self.spec, now, self.mechanism)
        jwk = {**key.public_key_jwk(), "kid": kid, "use": "enc", "alg": self.alg}
        with self._cond:
            self._counters.generated += 1
            self._counters.generate_seconds.append(time.perf_counter() - started)
        return _Pooled(key, kid, jwk, now)

    def _take(self) -> _Pooled:
        """The oldest pool key, waiting up to ``wait`` for the refiller."""
        deadline = time.monotonic() + self._wait
        with self._cond:
            while not self._pool:
                if self._closed:
                    raise InvalidInput(f"{self!r} is closed; open another with hsm.one_time_keys")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(self._exhausted_message())
                self._cond.wait(left)
            pooled = self._pool.popleft()
            self._cond.notify_all()  # a refiller may start on the free slot
            return pooled

    def _exhausted_message(self) -> str:
        if self._refill_error is not None:  # not a matter of rate: the refill fails
            return (
                f"no one-time key ready within {self._wait:g} s: refilling pool {self.name!r} "
                f"fails: {self._refill_error.message}"
            )
        return (
            f"no one-time key ready within {self._wait:g} s: issue() outran the refill of pool "
            f"{self.name!r}, which makes {self._rate():.1f} keys/s with {self._threads} "
            f"thread(s); raise pool= (now {self._target}) to absorb bursts, refill_threads= "
            f"(now {self._threads}) if the HSM has cores to spare, or wait= (now "
            f"{self._wait:g} s)"
        )

    def fill(self, timeout: float | None = None) -> None:
        """Wait until the pool is full (a service's warm-up); PoolExhausted after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._pool) < self._target and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolExhausted(
                        f"pool {self.name!r} holds {len(self._pool)} of {self._target} keys "
                        f"after {timeout:g} s (it refills at {self._rate():.1f} keys/s)"
                    )
                self._cond.wait(left)

    def _rate(self) -> float:
        """Pool keys per second the refillers make (from the last generations)."""
        times = list(self._counters.generate_seconds)
        return self._threads / statistics.median(times) if times else 0.0

    # -- issuing ----------------------------------------------------------------------------

    def issue(self) -> OneTimeKey:
        """A new one-time key from the pool: its kid, JWK, expiry and signed context."""
        from . import jose

        while True:
            pooled = self._take()
            now = to_instant(self.hsm.clock())
            if now - pooled.pooled < POOL_RETIRE:
                break
            self._discard(pooled)  # too old to be trusted as ours by other processes' sweeps
        expires_at = now + int(self.ttl.total_seconds())
        try:
            self._store.mark_issued(self.name, pooled.key, expires_at)
        except HSMError:
            self._discard(pooled)
            raise
        expires = from_instant(expires_at)
        pooled.key.validity = Validity(None, expires, self.hsm.clock, f"one-time key {pooled.kid}")
        with self._cond:
            self._issued[pooled.kid] = (pooled.key, expires_at)
            self._counters.issued += 1
        context = None
        if self.signer is not None:
            assert self.context_alg is not None
            claims = {"iat": now, "exp": expires_at, "jti": pooled.kid, "jwk": pooled.jwk}
            context = jose.sign_jwt(self.signer, claims, alg=self.context_alg)
        return OneTimeKey(pooled.kid, dict(pooled.jwk), expires, context)

    def _discard(self, pooled: _Pooled) -> None:
        with contextlib.suppress(HSMError):
            self._store.discard(pooled.key)

    # -- decrypting -------------------------------------------------------------------------

    def decrypt_jwe(self, token: str | bytes) -> bytes:
        """The plaintext of a compact JWE encrypted to an issued key (kid from its header).

        The CEK is unwrapped in the HSM and the content decrypted on the host
        (:func:`hsmbridge.jose.decrypt_jwe`). The key is used up by the attempt.
        """
        from . import jose

        header = jose.jwe_header(token)
        if header.get("alg") != self.alg:
            raise InvalidInput(
                f"the JWE's alg is {header.get('alg')!r} but pool {self.name!r} issues keys for "
                f"{self.alg} (the JWK's alg)"
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidInput("the JWE header has no 'kid'; one-time keys are found by kid")
        return self._use(kid, lambda key: jose.decrypt_jwe(key, token))

    def decrypt(self, kid: str, ciphertext: bytes, mechanism: str | Mechanism) -> bytes:
        """Raw RSA-OAEP with issued key ``kid`` (Flex v1 style: no JWE). The key is used up."""
        mech = parse_mechanism(mechanism, sign=False)
        if mech.family != "oaep":
            raise InvalidInput(
                f"one-time keys decrypt RSA-OAEP only, not {mech.value} (PKCS#1 v1.5 "
                "decryption is a padding oracle); use rsa-oaep-sha256 or rsa-oaep-sha1"
            )
        if mech not in self._offered():
            raise MechanismNotSupported(f"{self.hsm.description} cannot decrypt {mech.value}")
        if not isinstance(ciphertext, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"ciphertext must be bytes, not {type(ciphertext).__name__}")
        size = self.spec.bits // 8
        if len(ciphertext) != size:
            raise InvalidInput(
                f"the ciphertext is {len(ciphertext)} bytes; a one-time key of pool "
                f"{self.name!r} ({self.spec}) takes {size}-byte RSA ciphertexts"
            )
        return self._use(kid, lambda key: key.decrypt(bytes(ciphertext), mech))

    def _use(self, kid: object, decrypt: Callable[[Key], bytes]) -> bytes:
        """Claim ``kid``'s one decrypt, run it, destroy the key: the protocol's decrypt."""
        if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
            raise KeyNotFound(
                f"{str(kid)[:40]!r} is not a one-time key id (kids are 32 hex digits)"
            )
        try:
            entry = self._claim(kid)
        except KeyExpired:
            with self._cond:
                self._counters.refused += 1
            raise
        key = entry[0] if entry is not None else None  # this process's key: no lookup
        try:
            if key is None:
                try:
                    key = self._store.key(self.name, kid)
                except KeyNotFound:
                    raise KeyExpired(
                        f"one-time key {kid} was already used: its key is gone from "
                        f"{self.hsm.description}"
                    ) from None
            plaintext = decrypt(key)
        finally:
            with contextlib.suppress(HSMError):
                if key is not None:  # the key found above: no second lookup
                    self._store.discard(key)
                else:  # the lookup itself failed: destroy whatever is left
                    self._store.destroy_key(self.name, kid)
        with self._cond:
            self._counters.decrypted += 1
        return plaintext

    def _claim(self, kid: str) -> tuple[Key, int] | None:
        """Check ``kid`` is issued, unused and unexpired, then claim its decrypt;
        returns this process's entry for it, if it issued it."""
        if kid in self._used:
            raise KeyExpired(f"one-time key {kid} was already used: it decrypts once")
        expires_at = self._expiry(kid)
        now = self.hsm.clock()
        if now >= from_instant(expires_at):
            raise KeyExpired(
                f"one-time key {kid} expired at {from_instant(expires_at).isoformat()} (now "
                f"{now.isoformat()}); issue a new key"
            )
        other = self._store.claim(self.name, kid, expires_at)
        if other is not None:
            when = f" at {datetime.fromtimestamp(other, UTC).isoformat()}" if other else ""
            raise KeyExpired(
                f"one-time key {kid} was already used: a decrypt (in this or another process) "
                f"claimed it{when}; it decrypts once"
            )
        with self._cond:
            self._used[kid] = expires_at
            return self._issued.pop(kid, None)

    def _expiry(self, kid: str) -> int:
        entry = self._issued.get(kid)
        if entry is not None:
            return entry[1]
        expires_at = self._store.issued(self.name, kid)
        if expires_at is not None:
            return expires_at
        swept = self._swept.get(kid)
        if swept is not None:
            raise KeyExpired(
                f"one-time key {kid} expired at {from_instant(swept).isoformat()} and was "
                "destroyed by a sweep; issue a new key"
            )
        raise KeyNotFound(
            f"no one-time key with kid {kid} was issued from pool {self.name!r} in "
            f"{self.hsm.description} (or it expired and a sweep destroyed it)"
        )

    # -- housekeeping -----------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Destroy expired one-time keys (and pool keys orphaned by dead processes);
        returns the kids destroyed. Any process may sweep; run it every few minutes."""
        now = to_instant(self.hsm.clock())
        pool_keys, stored = self._store.contents(self.name)
        gone: list[str] = []
        with self._cond:
            mine = {p.kid for p in self._pool}
        for pooled in pool_keys:
            if pooled.kid not in mine and now - pooled.pooled >= POOL_ORPHANED:
                with contextlib.suppress(KeyNotFound):
                    self._store.forget(self.name, pooled.kid)
                    gone.append(pooled.kid)
        for record in stored:
            if now >= record.expires_at:
                self._store.forget(self.name, record.kid)
                with self._cond:
                    self._issued.pop(record.kid, None)
                    self._swept[record.kid] = record.expires_at
                    while len(self._swept) > REMEMBERED:
                        del self._swept[next(iter(self._swept))]
                    if not record.claims:
                        self._counters.expired += 1
                gone.append(record.kid)
            elif record.has_key and record.claims and record.claims_abandoned:
                self._store.destroy_key(self.name, record.kid)  # its decrypt died midway
                gone.append(record.kid)
        with self._cond:
            self._used = {kid: end for kid, end in self._used.items() if end > now}
        return gone

    def stats(self) -> dict[str, Any]:
        """Pool size and target, issued, decrypted, expired (swept unused), refused
        (second use or expired), and the refill rate in keys per second."""
        with self._cond:
            c = self._counters
            return {
                "pool_size": len(self._pool),
                "pool_target": self._target,
                "issued": c.issued,
                "decrypted": c.decrypted,
                "expired": c.expired,
                "refused": c.refused,
                "generated": c.generated,
                "refill_per_second": round(self._rate(), 3),
                "refill_threads": self._threads,
            }

    def close(self) -> None:
        """Stop the refillers and destroy the pool keys never issued. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._refillers:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            left, self._pool = list(self._pool), deque()
        for pooled in left:
            self._discard(pooled)
