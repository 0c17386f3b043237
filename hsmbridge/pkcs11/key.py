"""A key pair in a PKCS#11 token, and its two engines.

:meth:`Pkcs11Key._run` is the engine hook of :class:`hsmbridge.api.Key`. It
runs every operation, single or batch, on the native engine
(``hsmbridge._native``: one pthread per pooled session, the GIL released once
per call, ECDSA DER encoded in C) when it is built, else on the pure-Python
engine (:func:`hsmbridge.batch.run_batch` threads over the same pool). Both
give the same results; a session that breaks mid-batch is replaced and its
items repeated once (sign and decrypt are safe to repeat).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11x
from pkcs11 import Attribute, ObjectClass

from ..api import RSA, Key, KeyInfo, Op, Result, Validity, default_threads, require_usage
from ..batch import Operation, native_priority, run_batch, worker_nice
from ..errors import HSMError, InvalidInput, KeyNotFound
from ..mechanisms import Mechanism, ecdsa_raw_to_der
from . import certs, ec, rsa
from .capabilities import REFUSALS
from .errormap import SESSION_BROKEN, exception_for_rv, translate
from .pool import PooledSession

if TYPE_CHECKING:
    from cryptography import x509

    from .backend import Pkcs11HSM

log = logging.getLogger("hsmbridge.pkcs11")


class Pkcs11Key(Key):
    """A key pair in a PKCS#11 token, found by its private key object handle."""

    def __init__(self, hsm: Pkcs11HSM, info: KeyInfo, handle: int) -> None:
        super().__init__(info)
        self.hsm = hsm
        self.handle = handle
        self._generation = hsm.pool.generation

    def _follow_fork(self) -> None:
        """In a forked child the module was initialised again: object handles changed.

        The key is found again by its id (and label), as get_key would.
        """
        generation = self.hsm.pool.generation
        if generation == self._generation:
            return
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.TOKEN: True,
            Attribute.LABEL: self.label,
        }
        if self.info.id:
            template[Attribute.ID] = bytes.fromhex(self.info.id)
        with self.hsm.pool.admin() as session:
            found = list(session.get_objects(template))
        if len(found) != 1:
            raise KeyNotFound(
                f"key {self.label!r} (id {self.id!r}) is not in {self.hsm.description} any "
                "more, or no longer unique (after fork, the key is found again by id and label)"
            )
        handle = found[0].handle
        assert handle is not None
        self.handle = int(handle)
        self._generation = generation

    # -- the engine hook ---------------------------------------------------------------

    def _run(
        self,
        op: Op,
        mech: Mechanism,
        items: Sequence[bytes],
        *,
        threads: int,
        stop_on_error: bool,
        ecdsa_format: str,
    ) -> list[Result]:
        require_usage(self.info, mech)
        self.hsm.capabilities.require(mech)
        self._follow_fork()
        der = mech.family == "ecdsa" and ecdsa_format == "der"
        if self.hsm.native is None:
            return self._run_python(op, mech, items, threads, stop_on_error, der)
        return self._run_native(op, mech, items, threads, stop_on_error, der)

    def _run_native(
        self,
        op: Op,
        mech: Mechanism,
        items: Sequence[bytes],
        threads: int,
        stop_on_error: bool,
        der: bool,
    ) -> list[Result]:
        """One C call for the whole batch; broken sessions' items go round again in Python."""
        pool, native = self.hsm.pool, self.hsm.native
        assert native is not None
        ckm, _ = self._mechanism(mech)
        param = rsa.native_param(mech) if isinstance(self.spec, RSA) else None
        nice, idle = native_priority(worker_nice.get())
        sessions = pool.acquire_many(threads)
        try:
            raw = native.run_batch(
                self.hsm.module.path,
                0 if op == "sign" else 1,
                [s.handle for s in sessions],
                self.handle,
                int(ckm),
                param,
                list(items),
                self._output_length(),
                stop_on_error,
                der,
                nice,
                idle,
            )
            results: list[Result] = []
            redo: list[int] = []  # items lost to a broken session, safe to repeat
            for i, out in enumerate(raw):
                if out is None or isinstance(out, bytes):
                    results.append(out)
                    continue
                exc = exception_for_rv(out)
                if isinstance(exc, SESSION_BROKEN) or self._distrusts_session(exc):
                    for s in sessions:  # which session broke is unknown: replace all
                        s.broken = True
                if isinstance(exc, SESSION_BROKEN):
                    redo.append(i)
                results.append(self._op_error(exc, op, mech))
        finally:
            for s in sessions:
                pool.release(s)
        if redo:
            redo += [i for i, r in enumerate(results) if r is None]
            log.warning("PKCS#11 sessions broke in a batch; repeating %d items", len(redo))
            again = self._run_python(op, mech, [items[i] for i in redo], threads, False, der)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
        return results

    def _run_python(
        self,
        op: Op,
        mech: Mechanism,
        items: Sequence[bytes],
        threads: int,
        stop_on_error: bool,
        der: bool,
    ) -> list[Result]:
        out = run_batch(lambda: self._worker(op, mech), items, threads, stop_on_error)
        if der:
            return [ecdsa_raw_to_der(r) if isinstance(r, bytes) else r for r in out]
        return out

    @contextlib.contextmanager
    def _worker(self, op: Op, mech: Mechanism) -> Iterator[Operation]:
        """The pure-Python engine's worker: python-pkcs11 calls on one pooled session."""
        ckm, param = self._mechanism(mech)
        pool = self.hsm.pool
        pooled = pool.acquire()
        try:
            bound = [self._bound_object(pooled)]

            def operate(data: bytes) -> bytes:
                for attempt in (1, 2):
                    call = bound[0].sign if op == "sign" else bound[0].decrypt
                    try:
                        return bytes(call(data, mechanism=ckm, mechanism_param=param))
                    except SESSION_BROKEN as exc:
                        if attempt == 2 or not pool.reopen(pooled):
                            pooled.broken = True
                            raise self._op_error(exc, op, mech) from None
                        log.warning("PKCS#11 session broke (%s); replaced", type(exc).__name__)
                        bound[0] = self._bound_object(pooled)
                    except p11x.PKCS11Error as exc:
                        if self._distrusts_session(exc):
                            # tpm2-pkcs11 leaves a failed operation active: start afresh.
                            if pool.reopen(pooled):
                                bound[0] = self._bound_object(pooled)
                            else:
                                pooled.broken = True
                        raise self._op_error(exc, op, mech) from None
                raise AssertionError("unreachable")

            yield operate
        finally:
            pool.release(pooled)

    def _mechanism(self, mech: Mechanism) -> tuple[Any, Any]:
        """(CKM, parameter) for python-pkcs11."""
        return rsa.mechanism(mech) if isinstance(self.spec, RSA) else ec.mechanism(mech)

    def _output_length(self) -> int:
        spec = self.spec
        return spec.bits // 8 if isinstance(spec, RSA) else 2 * spec.field_bytes

    def _distrusts_session(self, exc: Exception) -> bool:
        """A CKR_GENERAL_ERROR / CKR_FUNCTION_FAILED from a module not measured to use
        them for bad padding: the session may be left mid-operation (tpm2-pkcs11 1.9
        answers every later call CKR_OPERATION_ACTIVE), so it is replaced."""
        return (
            isinstance(exc, (p11x.GeneralError, p11x.FunctionFailed))
            and not self.hsm.profile.facts.bad_padding_as_general_error
        )

    def _op_error(self, exc: Exception, op: str, mech: Mechanism) -> HSMError:
        """One translation of a failed sign/decrypt, for both engines."""
        if isinstance(exc, REFUSALS):
            error = self.hsm.capabilities.record_refusal(mech)
            if mech.family != "oaep":
                return error
            self.hsm.capabilities.probe_oaep(self.public_key(), self._probe_decrypt)
            return self.hsm.capabilities.not_supported(mech)
        if (
            op == "decrypt"
            and isinstance(exc, (p11x.GeneralError, p11x.FunctionFailed))
            and self.hsm.profile.facts.bad_padding_as_general_error
        ):
            # Only modules measured to answer bad padding this way (SoftHSM2);
            # elsewhere these codes mean the token failed, not the ciphertext.
            exc = p11x.EncryptedDataInvalid()
        what = f"{mech.value} {'signature' if op == 'sign' else 'decryption'}"
        return translate(exc, what=what, key=self.label)

    def _probe_decrypt(self, mech: Mechanism, ciphertext: bytes) -> bytes:
        """One decryption for the OAEP probe (python-pkcs11 errors pass through)."""
        ckm, param = rsa.mechanism(mech)
        with self.hsm.pool.session() as pooled:
            out = self._bound_object(pooled).decrypt(
                ciphertext, mechanism=ckm, mechanism_param=param
            )
        return bytes(out)

    # -- objects ---------------------------------------------------------------------------

    def _object_in(self, session: Any) -> Any:
        """This key's private object as seen through ``session`` (same handle)."""
        self._follow_fork()
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

    # -- public key, threads, delete ---------------------------------------------------------

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

    def _default_threads(self) -> int:
        return min(self.hsm.pool.max_workers, default_threads())

    def _load_validity(self) -> Validity | None:
        return self.hsm.rings.validity_of(self)

    def _delete(self) -> None:
        self.hsm.keys.forget_handle(self.handle)
        with self.hsm.pool.admin() as session:
            priv = self._object_in(session)
            pub = self.hsm._public_object(priv)
            try:
                for cert in certs.of_key(session, bytes.fromhex(self.id)) if self.id else ():
                    cert.destroy()
                if pub is not priv:
                    pub.destroy()
                priv.destroy()
            except Exception as exc:
                raise translate(exc, what="deleting the key", key=self.label) from None

    # -- certificate ---------------------------------------------------------------------------

    def _key_id(self) -> bytes:
        if not self.id:
            raise InvalidInput(
                f"key {self.label!r} has no CKA_ID, which links a certificate to its key in "
                "PKCS#11; give the key an id (pkcs11-tool --set-id) first"
            )
        return bytes.fromhex(self.id)

    @contextlib.contextmanager
    def _admin_doing(self, what: str) -> Iterator[Any]:
        """The admin session, with python-pkcs11 errors translated as ``what`` failing."""
        with self.hsm.pool.admin() as session:
            try:
                yield session
            except HSMError:
                raise
            except Exception as exc:
                raise translate(exc, what=what, key=self.label) from None

    def _fetch_certificate_der(self) -> bytes | None:
        with self._admin_doing("reading the certificate") as session:
            found = certs.of_key(session, self._key_id())
            return bytes(found[0][Attribute.VALUE]) if found else None

    def _store_certificate(self, cert: x509.Certificate) -> None:
        key_id = self._key_id()
        with self._admin_doing("storing the certificate") as session:
            self._object_in(session)  # the key is still there
            old = certs.of_key(session, key_id)
            session.create_object(certs.template(cert, key_id, self.label))
            for obj in old:
                obj.destroy()

    def _delete_certificate(self) -> bool:
        with self._admin_doing("deleting the certificate") as session:
            found = certs.of_key(session, self._key_id())
            for obj in found:
                obj.destroy()
            return bool(found)
