"""The token handle: :class:`Pkcs11HSM` (key management on one token).

The handle owns the pieces of the session design (see the package
docstring): the loaded module, the session pool and the token's
:class:`~.capabilities.Capabilities`. Keys themselves are :class:`~.key.Pkcs11Key`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pkcs11 import Attribute

from ..api import (
    HSM,
    RSA,
    Ed25519,
    Key,
    KeyInfo,
    KeySpec,
    check_expires_in,
    check_lookup,
    check_new_key,
)
from ..errors import (
    ConfigurationError,
    HSMError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
)
from ..mechanisms import RAW_USAGE, Mechanism
from ..rings import expiry_of, expiry_validity
from ..uri import Pkcs11URI, parse_pkcs11_uri
from . import certs, ec, lookup, rsa, secret
from .capabilities import Capabilities, ckm_of
from .errormap import translate
from .key import Pkcs11Key
from .module import load_module, load_native
from .pool import SessionPool
from .profile import build_profile
from .ringstore import Pkcs11RingStore, day_of
from .secret import Pkcs11SecretKey
from .slots import select_token
from .templates import Template, generate_with_templates, keeps_mechanisms

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from .otkstore import Pkcs11OneTimeStore

log = logging.getLogger("hsmbridge.pkcs11")


class Pkcs11HSM(HSM):
    """One token of a PKCS#11 module, shared safely by many threads."""

    def __init__(
        self, uri: Pkcs11URI, *, max_sessions: int | None = None, native: bool | None = None
    ) -> None:
        """``native=False`` forces the pure-Python batch engine (for comparison)."""
        if max_sessions is not None and (
            not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1
        ):
            raise InvalidInput(f"max_sessions must be a whole number >= 1, not {max_sessions!r}")
        self.module = load_module(
            uri.module_path, name=uri.module_name, init_reserved=uri.init_reserved
        )
        self.token = select_token(self.module, uri)
        self.description = f"token {self.token.label!r}"
        if uri.pin is None:
            raise ConfigurationError(
                f"no PIN for {self.description}; give pin-value= or pin-source= in the URI, "
                "pass pin=, or set HSMBRIDGE_PIN"
            )
        requested = max_sessions if max_sessions is not None else uri.max_sessions
        self.profile = build_profile(self.module, self.token, requested)
        slot = self.token.slot
        self.pool = SessionPool(
            self.token,
            uri.pin.value,
            self.profile.max_sessions,
            (self.module.path, int(slot.slot_id)),
            module=self.module,
        )
        self.native = load_native() if native is not False and self.module.thread_safe else None
        if native and self.native is None:
            raise ConfigurationError(
                "native=True but the native engine hsmbridge._native is not built "
                "(or this module is used from one thread); reinstall hsmbridge with a C "
                "compiler available"
            )
        self.capabilities = Capabilities(slot, self.description, self.pool.session)
        self.keys = lookup.KeyCache(self.description)  # get_key's validated handles
        self._uri_key: Pkcs11Key | None = None
        if uri.names_object:
            try:
                self._uri_key = self._key_named_by(uri)
            except HSMError:
                self.close()
                raise
        self.rings = Pkcs11RingStore(self)

    # -- key management ---------------------------------------------------------

    def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
        expires_in: timedelta | None = None,
    ) -> Pkcs11Key:
        check_expires_in(expires_in)
        not_after = expiry_of(self, expires_in) if expires_in is not None else None
        return self.generate_dated(spec, label, usage=usage, key_id=key_id, not_after=not_after)

    def generate_dated(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
        not_after: datetime | None = None,
        start: datetime | None = None,
        fresh: bool = False,
    ) -> Pkcs11Key:
        """:meth:`generate_key` with its dates set at creation: CKA_START_DATE from
        ``start``, CKA_END_DATE and a lifetime record from ``not_after``. Dates are
        never changed afterwards (docs/design.md, "Key rings").

        ``fresh``: the caller made ``key_id`` (and a label containing it) from 128
        random bits, so no other key can share them: the searches for a key
        with the same label or id, and the twin check after a pause, are
        skipped, and (on a token that takes concurrent sessions) the key is made
        on a session of its own instead of the admin session (one-time keys'
        pool; benchmarks/bench_onetime.py).
        """
        uses = check_new_key(spec, label, usage)
        gen = rsa.generate if isinstance(spec, RSA) else ec.generate

        def create(session: Any, public_t: Template, private_t: Template) -> Any:
            if start is not None:
                for template in (public_t, private_t):
                    template[Attribute.START_DATE] = day_of(start)
            return gen(session, spec, public_t, private_t)[1]  # type: ignore[arg-type]

        return self._create(
            spec, label, uses, key_id, create, f"generating a {spec} key", not_after, fresh
        )

    def import_key(
        self,
        private_key: PrivateKeyTypes,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> Pkcs11Key:
        """Write an RSA, EC or Ed25519 private key into the token (C_CreateObject),
        non-extractable.

        The objects get the same templates as generated keys; the public half
        is stored beside it under the same CKA_ID.
        """
        from cryptography.hazmat.primitives.asymmetric import ec as crypto_ec
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

        spec: KeySpec
        if isinstance(private_key, crypto_rsa.RSAPrivateKey):
            spec, to_templates = RSA(private_key.key_size), rsa.import_templates
        elif isinstance(private_key, crypto_ec.EllipticCurvePrivateKey):
            spec, to_templates = ec.spec_of_curve(private_key.curve.name), ec.import_templates
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            spec, to_templates = Ed25519(), ec.import_templates
        else:
            raise InvalidInput(
                f"cannot import {type(private_key).__name__}; give a cryptography RSA, EC or "
                "Ed25519 private key"
            )
        uses = check_new_key(spec, label, usage)

        def create(session: Any, public_t: Template, private_t: Template) -> Any:
            pub, priv = to_templates(private_key, public_t, private_t)  # type: ignore[operator]
            public_obj = session.create_object(pub)
            try:
                return session.create_object(priv)
            except Exception:
                public_obj.destroy()
                raise

        return self._create(spec, label, uses, key_id, create, f"importing a {spec} key")

    def _create(
        self,
        spec: KeySpec,
        label: str,
        usage: frozenset[str],
        key_id: str | None,
        create: Callable[[Any, Template, Template], Any],
        what: str,
        not_after: datetime | None = None,
        fresh: bool = False,
    ) -> Pkcs11Key:
        """Check label and id are free, then ``create(session, public_t, private_t)``.

        With ``not_after``, the key's lifetime record is written first (see
        :mod:`.ringstore`): a key never exists without it.
        """
        try:
            raw_id = bytes.fromhex(key_id) if key_id else os.urandom(16)
        except (ValueError, TypeError):
            raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None
        raw = RAW_USAGE in usage
        if raw:  # refused up front where the token has no CKM_RSA_X_509 (before any write)
            self.capabilities.require(Mechanism.RSA_RAW)
        aside = fresh and self.profile.max_sessions > 1 and self.module.thread_safe
        with self.pool.generator() if aside else self.pool.admin() as session:
            if not fresh and self._find(session, {Attribute.LABEL: label}):
                raise KeyExists(
                    f"a key labelled {label!r} already exists in {self.description}; "
                    "choose another label or delete the old key"
                )
            if not fresh and self._find(session, {Attribute.ID: raw_id}):
                raise KeyExists(
                    f"a key with id {raw_id.hex()!r} already exists in {self.description}; "
                    "choose another key_id or leave it out"
                )
            lifetime = None
            if not_after is not None:  # the record first: a key never exists without it
                lifetime = self.rings.expiry_templates(session, raw_id, not_after, ())

            def dated(public_t: Template, private_t: Template) -> Any:
                if not_after is not None:
                    for template in (public_t, private_t):
                        template[Attribute.END_DATE] = day_of(not_after)
                return create(session, public_t, private_t)

            try:
                priv = generate_with_templates(
                    dated,
                    raw_id,
                    label,
                    usage,
                    allowed_mechanisms(spec, usage),
                    self.profile.templates,
                    what=what,
                    needs_allowed=raw,
                )
                if raw:
                    lookup.check_kept_to_raw(priv, what)
            except Exception:
                if lifetime is not None:
                    with contextlib.suppress(Exception):
                        lifetime.destroy()
                raise
            finally:
                self.keys.forget(label, raw_id)
            key = Pkcs11Key(self, KeyInfo(label, raw_id.hex(), spec, usage), int(priv.handle))
            if fresh and isinstance(spec, RSA):  # read here: no search for it later
                key._der = rsa.public_key_der(priv)
            if not_after is not None:
                key.validity = expiry_validity(self, label, not_after)
        # The checks above and the creation are not one atomic step: another
        # process may have created the same label or id meanwhile. Whoever sees
        # a twin after creating withdraws, so two never both succeed (both may
        # withdraw; the caller tries again). SoftHSM2 shows another process's
        # new object only some time after creating it (two processes creating
        # at once both saw no twin in 1 of 4 runs), so the check is repeated
        # after a pause, without holding the admin session.
        twins = False
        for pause in () if fresh else (0.0, TWIN_RECHECK_SECONDS):
            time.sleep(pause)
            with self.pool.admin() as session:
                twins = self._has_twin(session, label, raw_id)
            if twins:
                break
        if twins:
            key.delete()
            raise KeyExists(
                f"another process created a key labelled {label!r} (or with id "
                f"{raw_id.hex()!r}) in {self.description} at the same moment; this one was "
                "withdrawn. Try again, or choose another label"
            )
        return key

    def generate_secret_key(
        self, bits: int, label: str, *, key_id: str | None = None
    ) -> Pkcs11SecretKey:
        return secret.generate(self, bits, label, key_id)

    def get_secret_key(self, *, key_id: str) -> Pkcs11SecretKey:
        return secret.get(self, key_id)

    def _has_twin(self, session: Any, label: str, raw_id: bytes) -> bool:
        """Whether another key shares ``label`` or ``raw_id`` with the one just made.

        Compared by (label, id), not by count: SoftHSM2 can return one object
        under two handles while another process changes the token (seen in
        benchmarks/soak.py). Two processes given the same explicit key_id and
        label are therefore not told apart; random ids always are.
        """
        mine = (label, raw_id)
        for template in ({Attribute.LABEL: label}, {Attribute.ID: raw_id}):
            for key in lookup.private_keys(session, template):
                if (key.label, key.id) != mine:
                    return True
        return False

    def get_key(
        self, label: str | None = None, *, key_id: str | None = None, uri: str | None = None
    ) -> Pkcs11Key:
        if uri is not None:
            if label is not None or key_id is not None:
                raise InvalidInput("get_key takes a label and/or key_id, or a uri; not both")
            # pin="": the URI only names a key here; nothing reads a PIN file or variable.
            return self._key_named_by(parse_pkcs11_uri(uri, pin=""))
        wanted = check_lookup(label, key_id)  # a non-str label segfaults python-pkcs11
        raw_id = None
        if key_id is not None:
            try:
                raw_id = bytes.fromhex(key_id)
            except ValueError:
                raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None
        with self.pool.admin() as session:
            handle, info = self.keys.find(session, label, raw_id, wanted)
        return Pkcs11Key(self, info, handle)

    @property
    def key(self) -> Pkcs11Key:
        """The key named by the URI this handle was opened with (object=, id=, type=)."""
        if self._uri_key is None:
            return super().key  # type: ignore[return-value]  # raises InvalidInput
        return self._uri_key

    def _key_named_by(self, uri: Pkcs11URI) -> Pkcs11Key:
        """The one key pair an RFC 7512 URI's object/id/type name on this token."""
        if uri.type not in (None, "private", "public"):
            raise InvalidInput(
                f"the URI's type is {uri.type}; hsmbridge uses key pairs: type=private "
                "(or public) with object=LABEL and/or id=%HEX"
            )
        if uri.object is None and uri.id is None:
            raise InvalidInput("the URI names no key: add object=LABEL and/or id=%HEX")
        token, slot_id = self.token, int(self.token.slot.slot_id)
        serial = token.serial.decode(errors="replace").strip()
        for name, wanted, actual in (
            ("token", uri.token, token.label),
            ("serial", uri.serial, serial),
            ("manufacturer", uri.manufacturer, token.manufacturer_id),
            ("model", uri.model, token.model),
            ("slot-id", uri.slot_id, slot_id),
        ):
            if wanted is not None and wanted != actual:
                raise InvalidInput(
                    f"the URI names {name} {wanted!r}, but this handle is on {self.description} "
                    f"({name} {actual!r}); open that token to use its keys"
                )
        return self.get_key(uri.object, key_id=uri.id.hex() if uri.id is not None else None)

    def list_keys(self) -> list[KeyInfo]:
        with self.pool.admin() as session:
            return self._infos(session)

    def _keys_with_certificate_subject(self, name: x509.Name) -> list[Key]:
        """One search over the token's certificates, then their keys by CKA_ID."""
        with self.pool.admin() as session:
            try:
                key_ids = certs.key_ids_with_subject(session, name)
            except Exception as exc:
                raise translate(exc, what="searching certificates") from None
        found: list[Key] = []
        for key_id in key_ids:
            with contextlib.suppress(KeyNotFound):  # a certificate without its key (a CA's)
                found.append(self.get_key(key_id=key_id.hex()))
        return found

    def _find(self, session: Any, template: dict[Attribute, Any]) -> list[Any]:
        # lookup.private_keys asks for CKA_TOKEN true: session objects never match.
        return [key.obj for key in lookup.private_keys(session, template)]

    def _infos(self, session: Any) -> list[KeyInfo]:
        return lookup.list_infos(session)

    def _info(self, priv: Any) -> KeyInfo:
        return lookup.info_with_public(
            lookup.PrivateKey(priv, lookup.read(priv, lookup.PRIVATE_FIELDS))
        )

    def _public_object(self, priv: Any) -> Any:
        """The public key paired with ``priv`` (same CKA_ID and key type; if other
        applications reused the id, the one with the same label), or priv itself."""
        return lookup.public_half(priv)

    # -- mechanisms and lifetime --------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Worker sessions open and idle (a leak shows as open sessions that never go idle)."""
        open_, idle = self.pool.counts()
        return {
            "sessions_open": open_,
            "sessions_idle": idle,
            "sessions_max": self.pool.max_workers,
        }

    def info(self) -> dict[str, Any]:
        """The token, and what was learned about it and its module (``hsmbridge info``)."""
        token, slot = self.token, self.token.slot
        return {
            "hsm": self.description,
            "token": token.label,
            "token manufacturer": token.manufacturer_id,
            "token model": token.model,
            "token serial": token.serial.decode(errors="replace").strip(),
            "slot-id": int(slot.slot_id),
            "slot description": slot.slot_description,
            **self.profile.describe(),
            "mechanisms": [m.value for m in self.supported_mechanisms()],
        }

    def ring_store(self) -> Pkcs11RingStore:
        return self.rings

    def one_time_store(self) -> Pkcs11OneTimeStore:
        """One-time keys refill their pool in a background thread, while other threads
        issue and decrypt: a token that cannot take that is refused here."""
        from .otkstore import Pkcs11OneTimeStore

        if not (self.profile.facts.concurrent_sessions and self.module.thread_safe):
            raise ConfigurationError(
                f"{self.description} ({self.profile.facts.name}) is not known to work with "
                "several sessions used at once, which one-time keys need (their pool is "
                "refilled in the background while keys are issued and used); use a token "
                "that does (hsmbridge info shows 'concurrent sessions')"
            )
        return Pkcs11OneTimeStore(self)

    def supported_mechanisms(self) -> list[Mechanism]:
        """hsmbridge mechanisms the token offers (see :class:`Capabilities`); rsa-raw only
        where keys can be kept to it (CKA_ALLOWED_MECHANISMS, as far as known)."""
        keeps = keeps_mechanisms(self.profile.templates)
        return [m for m in self.capabilities.offered() if keeps or m is not Mechanism.RSA_RAW]

    def close(self) -> None:
        self.pool.close()


#: how long after creating a key its label is checked again for a twin (seconds)
TWIN_RECHECK_SECONDS = 0.02


def allowed_mechanisms(spec: KeySpec, usage: frozenset[str]) -> set[Any]:
    """The PKCS#11 mechanisms a key of ``spec`` made for ``usage`` may be used with."""
    return {ckm_of(m) for m in Mechanism if m.key_type == spec.key_type and m.usage in usage}
