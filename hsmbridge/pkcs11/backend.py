"""The PKCS#11 backend: :class:`Pkcs11HSM` and :class:`Pkcs11Key`."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag

from ..api import EC, HSM, RSA, Key, KeyInfo, KeySpec, check_new_key
from ..batch import BatchWorker, Operation
from ..errors import (
    AmbiguousKey,
    BatchItemError,
    ConfigurationError,
    HSMError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    MechanismNotSupported,
    TokenNotFound,
)
from ..mechanisms import DECRYPT_MECHANISMS, SIGN_MECHANISMS, Mechanism
from ..uri import Pkcs11URI
from . import ec, rsa
from .errormap import SESSION_BROKEN, exception_for_rv, translate
from .module import LoadedModule, load_module, load_native
from .pool import PooledSession, SessionPool
from .templates import key_pair_templates

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
        self._supported: list[Mechanism] | None = None
        self._copies: dict[int, int] = {}  # token key handle -> session copy handle
        self._copy_objects: dict[int, Any] = {}
        self._copies_lock = threading.Lock()
        self._rejected: set[Mechanism] = set()  # listed, but the token refused the parameters
        self._confirmed: set[Mechanism] = set()  # parameters the token has accepted

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
        try:
            raw_id = bytes.fromhex(key_id) if key_id else os.urandom(16)
        except (ValueError, TypeError):
            raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None
        public_t, private_t = key_pair_templates(raw_id, label, uses)
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
                gen = rsa.generate if isinstance(spec, RSA) else ec.generate
                _, priv = gen(session, spec, public_t, private_t)  # type: ignore[arg-type]
            except HSMError:
                raise
            except Exception as exc:
                raise translate(exc, what=f"generating a {spec} key") from None
            return Pkcs11Key(self, KeyInfo(label, raw_id.hex(), spec, uses), int(priv.handle))

    def get_key(self, label: str | None = None, *, key_id: str | None = None) -> Pkcs11Key:
        if label is None and key_id is None:
            raise InvalidInput("get_key needs a label or a key_id")
        for name, value in (("label", label), ("key_id", key_id)):
            if value is not None and not isinstance(value, str):  # python-pkcs11 segfaults
                raise InvalidInput(f"get_key's {name} must be a str, not {type(value).__name__}")
        template: dict[Attribute, Any] = {}
        if label is not None:
            template[Attribute.LABEL] = label
        if key_id is not None:
            try:
                template[Attribute.ID] = bytes.fromhex(key_id)
            except ValueError:
                raise InvalidInput(f"PKCS#11 key ids are hex strings, got {key_id!r}") from None
        wanted = " and ".join(
            f"{k} {v!r}" for k, v in (("label", label), ("id", key_id)) if v is not None
        )
        with self.pool.admin() as session:
            found = self._find(session, template)
            if not found:
                known = [info.label for info in self._infos(session)][:20]
                raise KeyNotFound(
                    f"no key with {wanted} in {self.description}; keys present: "
                    + (", ".join(repr(k) for k in known) or "none")
                )
            if len(found) > 1:
                ids = ", ".join(bytes(o[Attribute.ID]).hex() or "(no id)" for o in found)
                raise AmbiguousKey(
                    f"{len(found)} keys have {wanted} in {self.description} (ids: {ids}); "
                    "ask by key_id or give the keys unique labels"
                )
            return Pkcs11Key(self, self._info(found[0]), int(found[0].handle))

    def list_keys(self) -> list[KeyInfo]:
        with self.pool.admin() as session:
            return self._infos(session)

    def _find(self, session: Any, template: dict[Attribute, Any]) -> list[Any]:
        # CKA_TOKEN: never return the session-object copies made for batches.
        template = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.TOKEN: True, **template}
        try:
            return [
                o for o in session.get_objects(template) if o.key_type in (KeyType.RSA, KeyType.EC)
            ]
        except Exception as exc:
            raise translate(exc, what="searching keys") from None

    def _infos(self, session: Any) -> list[KeyInfo]:
        infos = []
        for obj in self._find(session, {}):
            with contextlib.suppress(HSMError):
                infos.append(self._info(obj))
        return sorted(infos, key=lambda i: (i.label, i.id))

    def _info(self, priv: Any) -> KeyInfo:
        spec: KeySpec
        if priv.key_type == KeyType.RSA:
            spec = rsa.spec_of(priv)
        else:
            spec = ec.spec_of(self._public_object(priv))
        usage = {
            name
            for name, attr in (("sign", Attribute.SIGN), ("decrypt", Attribute.DECRYPT))
            if _attr(priv, attr, False)
        }
        if isinstance(spec, EC):  # modules (SoftHSM2) default CKA_DECRYPT to true on EC keys
            usage.discard("decrypt")
        label = _attr(priv, Attribute.LABEL, "") or ""
        return KeyInfo(label, bytes(_attr(priv, Attribute.ID, b"")).hex(), spec, frozenset(usage))

    def _public_object(self, priv: Any) -> Any:
        """The public key paired with ``priv`` (same CKA_ID and key type; if other
        applications reused the id, the one with the same label), or priv itself."""
        key_id = _attr(priv, Attribute.ID, None)
        if key_id:
            template = {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.ID: key_id,
                Attribute.KEY_TYPE: priv.key_type,
            }
            found = list(priv.session.get_objects(template))
            label = _attr(priv, Attribute.LABEL, None)
            for pub in found:
                if _attr(pub, Attribute.LABEL, None) == label:
                    return pub
            if found:
                return found[0]
        return priv  # RSA private keys carry modulus and exponent; EC ones may carry EC_PARAMS

    # -- mechanisms ---------------------------------------------------------------

    def supported_mechanisms(self) -> list[Mechanism]:
        """hsmbridge mechanisms the token lists (minus parameters it has refused)."""
        if self._supported is None:
            try:
                listed = set(self.token.slot.get_mechanisms())
            except Exception as exc:
                raise translate(exc, what="listing mechanisms") from None
            self._supported = [
                mech
                for mech in (*SIGN_MECHANISMS, *DECRYPT_MECHANISMS)
                if (ec.mechanism()[0] if mech.key_type == "ec" else rsa.mechanism(mech)[0])
                in listed
            ]
        return [m for m in self._supported if m not in self._rejected]

    def check_mechanism(self, mech: Mechanism) -> None:
        if mech in self._rejected or mech not in self.supported_mechanisms():
            raise self.unsupported(mech)

    def unsupported(self, mech: Mechanism) -> MechanismNotSupported:
        self._rejected.add(mech)
        offered = [m.value for m in self.supported_mechanisms() if m.is_sign == mech.is_sign]
        return MechanismNotSupported(
            f"{self.description} does not support {mech.value}; it offers: "
            + (", ".join(offered) or "nothing of this kind")
        )

    def session_copy(self, key: Pkcs11Key) -> int:
        """Handle of a session-object copy of ``key``'s private half, made once.

        SoftHSM2 re-checks a token object's files on every use; a copy with
        CKA_TOKEN=false skips that (docs/design.md, fact 5; measured: ECDSA P-256
        CPU per signature 77 -> 66 us, RSA unchanged). The copy lives in the
        logged-in admin session, has no label or id, is excluded from every
        search, and is destroyed with the key or when this handle closes.
        Modules that refuse the copy (or keys that are not modifiable) keep
        using the token object.
        """
        with self._copies_lock:
            if key.handle not in self._copies:
                self._copies[key.handle] = self._make_copy(key)
            return self._copies[key.handle]

    def _make_copy(self, key: Pkcs11Key) -> int:
        try:
            with self.pool.admin() as session:
                obj = key._object_in(session)
                copy = obj.copy({Attribute.TOKEN: False, Attribute.LABEL: "", Attribute.ID: b""})
                self._copy_objects[int(copy.handle)] = copy
                return int(copy.handle)
        except (p11x.PKCS11Error, HSMError) as exc:
            log.info("no session copy of key %r (%s); using the token object", key.label, exc)
            return key.handle

    def drop_session_copy(self, key: Pkcs11Key) -> None:
        with self._copies_lock:
            handle = self._copies.pop(key.handle, None)
            copy = self._copy_objects.pop(handle, None) if handle is not None else None
        if copy is not None:
            with contextlib.suppress(Exception), self.pool.admin():
                copy.destroy()

    def close(self) -> None:
        with self._copies_lock:
            copies = list(self._copy_objects.values())
            self._copies.clear()
            self._copy_objects.clear()
        for copy in copies:
            with contextlib.suppress(Exception), self.pool.admin():
                copy.destroy()
        self.pool.close()


def _attr(obj: Any, attr: Attribute, default: Any) -> Any:
    try:
        return obj[attr]
    except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, KeyError):
        return default


class Pkcs11Key(Key):
    """A key pair in a PKCS#11 token, found by its private key object handle."""

    def __init__(self, hsm: Pkcs11HSM, info: KeyInfo, handle: int) -> None:
        super().__init__(info)
        self.hsm = hsm
        self.handle = handle

    def _fetch_public_key_der(self) -> bytes:
        with self.hsm.pool.admin() as session:
            priv = self._object_in(session)
            if isinstance(self.spec, RSA):
                return rsa.public_key_der(priv)
            try:
                return ec.public_key_der(self.hsm._public_object(priv))
            except p11x.AttributeTypeInvalid:  # only the private object, which has no point
                raise KeyNotFound(
                    f"the public key of {self.label!r} (id {self.id!r}) is not in "
                    f"{self.hsm.description}; import it there to export it"
                ) from None

    def _object_in(self, session: Any) -> Any:
        """This key's private object as seen through ``session`` (same handle)."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.TOKEN: True,
        }
        if self.info.id:
            template[Attribute.ID] = bytes.fromhex(self.info.id)
        for obj in session.get_objects(template):
            if int(obj.handle) == self.handle:
                return obj
        raise KeyNotFound(
            f"key {self.label!r} no longer exists in {self.hsm.description} "
            "(deleted by another handle or process?)"
        )

    def _pkcs11_mechanism(self, mech: Mechanism) -> tuple[Any, Any]:
        self.hsm.check_mechanism(mech)
        return ec.mechanism() if isinstance(self.spec, EC) else rsa.mechanism(mech)

    def _check_usage(self, op: Literal["sign", "decrypt"]) -> None:
        if op not in self.info.usage:
            raise InvalidInput(
                f"key {self.label!r} was not made for {op} (its usage is "
                f"{sorted(self.info.usage)}); generate a key with usage={{'{op}'}}"
            )

    def _op_error(self, exc: Exception, op: str, mech: Mechanism) -> HSMError:
        """One translation of a failed sign/decrypt, for both engines."""
        what = f"{mech.value} {'signature' if op == 'sign' else 'decryption'}"
        if isinstance(exc, (p11x.ArgumentsBad, p11x.MechanismParamInvalid, p11x.MechanismInvalid)):
            self.hsm._rejected.add(mech)
            if mech.family == "oaep":
                self._probe_oaep()
            return self.hsm.unsupported(mech)
        if op == "decrypt" and isinstance(exc, (p11x.GeneralError, p11x.FunctionFailed)):
            exc = p11x.EncryptedDataInvalid()  # SoftHSM2 answers bad OAEP padding this way
        return translate(exc, what=what, key=self.label)

    def _probe_oaep(self) -> None:
        """Learn which OAEP hashes the token really takes, so errors name only those.

        Tokens list one CKM_RSA_PKCS_OAEP whatever hashes they implement
        (SoftHSM2: SHA-1 only). The probe decrypts a random value encrypted
        here with the public key, once per untried hash.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

        hsm = self.hsm
        pub = self.public_key()
        if not isinstance(pub, crypto_rsa.RSAPublicKey) or "decrypt" not in self.info.usage:
            return
        for mech in DECRYPT_MECHANISMS:
            if mech.family != "oaep" or mech in hsm._rejected or mech in hsm._confirmed:
                continue
            assert mech.hash_name is not None
            algorithm = hashes.Hash(getattr(hashes, mech.hash_name.upper())()).algorithm
            probe = os.urandom(16)
            try:
                ciphertext = pub.encrypt(
                    probe, padding.OAEP(padding.MGF1(algorithm), algorithm, None)
                )
            except ValueError:
                continue  # the key is too small for this hash; no verdict
            ckm, param = rsa.mechanism(mech)
            try:
                with hsm.pool.session() as pooled:
                    out = self._bound_object(pooled).decrypt(
                        ciphertext, mechanism=ckm, mechanism_param=param
                    )
            except (p11x.ArgumentsBad, p11x.MechanismParamInvalid, p11x.MechanismInvalid):
                hsm._rejected.add(mech)
                continue
            except p11x.PKCS11Error:
                continue  # not a verdict on the mechanism
            if bytes(out) == probe:
                hsm._confirmed.add(mech)

    @contextlib.contextmanager
    def _worker(self, op: Literal["sign", "decrypt"], mech: Mechanism) -> Iterator[Operation]:
        """The pure-Python engine: python-pkcs11 calls on one pooled session."""
        self._check_usage(op)
        ckm, param = self._pkcs11_mechanism(mech)
        pooled = self.hsm.pool.acquire()
        try:
            bound = [self._bound_object(pooled)]

            def operate(data: bytes) -> bytes:
                for attempt in (1, 2):
                    obj = bound[0]
                    try:
                        call = obj.sign if op == "sign" else obj.decrypt
                        return bytes(call(data, mechanism=ckm, mechanism_param=param))
                    except SESSION_BROKEN as exc:
                        # Sign and decrypt are safe to repeat: replace the session, retry once.
                        if attempt == 2 or not self.hsm.pool.reopen(pooled):
                            pooled.broken = True
                            raise self._op_error(exc, op, mech) from None
                        log.warning("PKCS#11 session broke (%s); replaced", type(exc).__name__)
                        bound[0] = self._bound_object(pooled)
                    except p11x.PKCS11Error as exc:
                        raise self._op_error(exc, op, mech) from None
                raise AssertionError("unreachable")

            yield operate
        finally:
            self.hsm.pool.release(pooled)

    def _bound_object(self, pooled: PooledSession) -> Any:
        """The key's object in this worker session (looked up once per session).

        A session found dead here is replaced once before giving up.
        """
        obj = pooled.objects.get(self.handle)
        for attempt in (1, 2):
            if obj is not None:
                break
            try:
                obj = pooled.objects[self.handle] = self._object_in(pooled.session)
            except SESSION_BROKEN as exc:
                if attempt == 2 or not self.hsm.pool.reopen(pooled):
                    pooled.broken = True
                    raise translate(exc, what="finding the key", key=self.label) from None
        return obj

    def _batch_worker(self, op: Literal["sign", "decrypt"], mech: Mechanism) -> BatchWorker:
        return self._worker(op, mech)

    def _output_length(self) -> int:
        spec = self.spec
        return spec.bits // 8 if isinstance(spec, RSA) else ec.output_length(spec)

    def _run_prepared(
        self,
        op: Literal["sign", "decrypt"],
        mech: Mechanism,
        items: Sequence[bytes],
        threads: int,
        return_exceptions: bool,
        *,
        ecdsa_der: bool = False,
    ) -> list[bytes | HSMError]:
        """Everything goes to the native engine when it is built (the Python engine else)."""
        engine = self.hsm.native
        if engine is None or not items:
            return super()._run_prepared(
                op, mech, items, threads, return_exceptions, ecdsa_der=ecdsa_der
            )
        self._check_usage(op)
        ckm, _ = self._pkcs11_mechanism(mech)
        param = rsa.native_param(mech) if isinstance(self.spec, RSA) else None
        sessions = self.hsm.pool.acquire_many(threads)
        try:
            raw = engine.run_batch(
                self.hsm.module.path,
                0 if op == "sign" else 1,
                [s.handle for s in sessions],
                self.hsm.session_copy(self),
                int(ckm),
                param,
                list(items),
                self._output_length(),
                not return_exceptions,
                ecdsa_der,
            )
            results: list[Any] = []  # None marks items a stopped batch never attempted
            redo: list[int] = []  # items lost to a broken session, safe to repeat
            for i, out in enumerate(raw):
                if out is None or isinstance(out, bytes):
                    results.append(out)
                    continue
                exc = exception_for_rv(out)
                if isinstance(exc, SESSION_BROKEN):
                    for s in sessions:  # which session broke is unknown: replace all
                        s.broken = True
                    redo.append(i)
                results.append(self._op_error(exc, op, mech))
        finally:
            for s in sessions:
                self.hsm.pool.release(s)
        if redo:
            redo += [i for i, r in enumerate(results) if r is None]
            log.warning("PKCS#11 sessions broke in a batch; repeating %d items", len(redo))
            again = super()._run_prepared(
                op, mech, [items[i] for i in redo], threads, True, ecdsa_der=ecdsa_der
            )
            for i, r in zip(redo, again, strict=True):
                results[i] = r
        if not return_exceptions:
            for i, r in enumerate(results):
                if isinstance(r, HSMError):
                    raise BatchItemError(i, r)
        return results

    def _default_threads(self) -> int:
        return min(self.hsm.pool.max_workers, os.cpu_count() or 1)

    def _delete(self) -> None:
        self.hsm.drop_session_copy(self)
        with self.hsm.pool.admin() as session:
            priv = self._object_in(session)
            pub = self.hsm._public_object(priv)
            try:
                if pub is not priv:
                    pub.destroy()
                priv.destroy()
            except Exception as exc:
                raise translate(exc, what="deleting the key", key=self.label) from None
