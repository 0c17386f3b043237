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
from typing import TYPE_CHECKING, Any

from pkcs11 import Attribute, TokenFlag

from ..api import HSM, RSA, Ed25519, Key, KeyInfo, KeySpec, check_lookup, check_new_key
from ..errors import (
    ConfigurationError,
    HSMError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    TokenNotFound,
)
from ..mechanisms import Mechanism
from ..uri import Pkcs11URI
from . import certs, ec, lookup, rsa
from .capabilities import Capabilities, ckm_of
from .errormap import translate
from .key import Pkcs11Key
from .module import LoadedModule, load_module, load_native
from .pool import SessionPool
from .templates import Template, key_pair_templates

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger("hsmbridge.pkcs11")


def _select_token(module: LoadedModule, uri: Pkcs11URI) -> Any:
    try:
        slots = module.lib.get_slots(token_present=True)
    except Exception as exc:
        raise translate(exc, what="listing slots") from None
    matches = []
    initialized = []
    for slot in slots:
        token = slot.get_token()
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        initialized.append(token)
        if uri.slot_id is not None and slot.slot_id != uri.slot_id:
            continue
        if uri.token is not None and token.label != uri.token:
            continue
        if uri.serial is not None and token.serial.decode(errors="replace").strip() != uri.serial:
            continue
        if uri.manufacturer is not None and token.manufacturer_id != uri.manufacturer:
            continue
        if uri.model is not None and token.model != uri.model:
            continue
        matches.append(token)
    if not matches:
        present = ", ".join(repr(t.label) for t in initialized) or "none"
        raise TokenNotFound(
            f"no {uri.describe()} in PKCS#11 module {module.path!r}; tokens present: {present}. "
            "Fix token=/serial=/slot-id= in the URI (for SoftHSM2, check SOFTHSM2_CONF)"
        )
    if len(matches) > 1:
        raise TokenNotFound(
            f"{len(matches)} tokens match {uri.describe()}; add serial= or slot-id= to the URI"
        )
    return matches[0]


class Pkcs11HSM(HSM):
    """One token of a PKCS#11 module, shared safely by many threads."""

    def __init__(
        self, uri: Pkcs11URI, *, max_sessions: int | None = None, native: bool | None = None
    ) -> None:
        """``native=False`` forces the pure-Python batch engine (for comparison)."""
        self.module = load_module(uri.module_path)
        self.token = _select_token(self.module, uri)
        self.description = f"token {self.token.label!r}"
        if uri.pin is None:
            raise ConfigurationError(
                f"no PIN for {self.description}; give pin-value= or pin-source= in the URI, "
                "pass pin=, or set HSMBRIDGE_PIN"
            )
        if max_sessions is not None and (
            not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1
        ):
            raise InvalidInput(f"max_sessions must be a whole number >= 1, not {max_sessions!r}")
        workers = max_sessions or max(4, 2 * (os.cpu_count() or 1))
        if not self.module.thread_safe:
            workers = 1
        slot = self.token.slot
        self.pool = SessionPool(
            self.token, uri.pin.value, workers, (self.module.path, int(slot.slot_id))
        )
        self.native = load_native() if native is not False and self.module.thread_safe else None
        if native and self.native is None:
            raise ConfigurationError(
                "native=True but the native engine hsmbridge._native is not built; "
                "reinstall hsmbridge with a C compiler available"
            )
        self.capabilities = Capabilities(slot, self.description)
        self.keys = lookup.KeyCache(self.description)  # get_key's validated handles

    # -- key management ---------------------------------------------------------

    def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> Pkcs11Key:
        uses = check_new_key(spec, label, usage)
        gen = rsa.generate if isinstance(spec, RSA) else ec.generate

        def create(session: Any, public_t: Template, private_t: Template) -> Any:
            return gen(session, spec, public_t, private_t)[1]  # type: ignore[arg-type]

        return self._create(spec, label, uses, key_id, create, f"generating a {spec} key")

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
    ) -> Pkcs11Key:
        """Check label and id are free, then ``create(session, public_t, private_t)``."""
        try:
            raw_id = bytes.fromhex(key_id) if key_id else os.urandom(16)
        except (ValueError, TypeError):
            raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None
        public_t, private_t = key_pair_templates(
            raw_id, label, usage, allowed_mechanisms(spec, usage)
        )
        with self.pool.admin() as session:
            if self._find(session, {Attribute.LABEL: label}):
                raise KeyExists(
                    f"a key labelled {label!r} already exists in {self.description}; "
                    "choose another label or delete the old key"
                )
            if self._find(session, {Attribute.ID: raw_id}):
                raise KeyExists(
                    f"a key with id {raw_id.hex()!r} already exists in {self.description}; "
                    "choose another key_id or leave it out"
                )
            try:
                priv = create(session, public_t, private_t)
            except HSMError:
                raise
            except Exception as exc:
                raise translate(exc, what=what) from None
            finally:
                self.keys.forget(label, raw_id)
            key = Pkcs11Key(self, KeyInfo(label, raw_id.hex(), spec, usage), int(priv.handle))
        # The checks above and the creation are not one atomic step: another
        # process may have created the same label or id meanwhile. Whoever sees
        # a twin after creating withdraws, so two never both succeed (both may
        # withdraw; the caller tries again). SoftHSM2 shows another process's
        # new object only some time after creating it (two processes creating
        # at once both saw no twin in 1 of 4 runs), so the check is repeated
        # after a pause, without holding the admin session.
        twins = False
        for pause in (0.0, TWIN_RECHECK_SECONDS):
            time.sleep(pause)
            with self.pool.admin() as session:
                twins = len(self._find(session, {Attribute.LABEL: label})) > 1 or (
                    len(self._find(session, {Attribute.ID: raw_id})) > 1
                )
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

    def get_key(self, label: str | None = None, *, key_id: str | None = None) -> Pkcs11Key:
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
        # CKA_TOKEN: never return the session-object copies made for batches.
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

    def supported_mechanisms(self) -> list[Mechanism]:
        """hsmbridge mechanisms the token offers (see :class:`Capabilities`)."""
        return self.capabilities.offered()

    def close(self) -> None:
        self.pool.close()


#: how long after creating a key its label is checked again for a twin (seconds)
TWIN_RECHECK_SECONDS = 0.02


def allowed_mechanisms(spec: KeySpec, usage: frozenset[str]) -> set[Any]:
    """The PKCS#11 mechanisms a key of ``spec`` made for ``usage`` may be used with."""
    return {
        ckm_of(m)
        for m in Mechanism
        if m.key_type == spec.key_type and ("sign" if m.is_sign else "decrypt") in usage
    }
