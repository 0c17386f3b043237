"""The NetHSM backend: :class:`NetHSM` and :class:`NetHSMKey` over the REST API.

NetHSM splits roles: an Administrator generates and deletes keys, an Operator
signs and decrypts. A handle opened as one user can do what that user's role
allows, and errors name the role an operation needs; a handle may also carry
an ``admin=`` and an ``operator=`` credential, and then picks the one each
request needs, so one :class:`NetHSM` can do everything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..api import (
    EC,
    HSM,
    Key,
    KeyInfo,
    KeySpec,
    Op,
    Result,
    Validity,
    check_expires_in,
    check_lookup,
    check_new_key,
    require_usage,
)
from ..batch import Operation, run_batch
from ..errors import (
    AmbiguousKey,
    ConfigurationError,
    HSMError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    MechanismNotSupported,
)
from ..mechanisms import Mechanism, ecdsa_der_to_raw
from ..rings import expiry_of
from ..uri import Secret, parse_nethsm_uri
from . import vocabulary
from .client import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    Client,
    Credential,
    TLSConfig,
)
from .errors import ADMINISTRATOR, ANY_USER, OPERATOR, Answer, Call
from .ringstore import NetHSMRingStore

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from .otkstore import NetHSMOneTimeStore

PASSWORD_ENV = "NETHSM_PASSWORD"
#: URI query parameters (``?name=value``) and the from_uri option each sets.
_URI_PARAMS = {
    "fingerprint": "fingerprint",
    "ca": "ca",
    "verify": "verify",
    "timeout": "timeout",
    "retries": "retries",
    "max-connections": "max_connections",
    "max_connections": "max_connections",
}
#: Default batch parallelism: enough requests in flight to hide network latency.
DEFAULT_THREADS = 12


def _credential(value: Any, role: str) -> Credential | None:
    if value is None or isinstance(value, Credential):
        return value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ):
        return Credential(value[0], Secret(value[1]))
    option = "admin" if role == ADMINISTRATOR else "operator"
    raise ConfigurationError(f"{option}= must be a (user, password) pair of strings")


class NetHSM(HSM):
    """A NetHSM (or several instances of one) reached over its REST API."""

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        user: str,
        password: str | None = None,
        *,
        admin: tuple[str, str] | Credential | None = None,
        operator: tuple[str, str] | Credential | None = None,
        tls: TLSConfig | None = None,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self._admin = _credential(admin, ADMINISTRATOR)
        self._operator = _credential(operator, OPERATOR)
        if password is None:
            password = os.environ.get(PASSWORD_ENV)
        if password is None:
            same = [c for c in (self._admin, self._operator) if c is not None and c.user == user]
            if not same:
                raise ConfigurationError(
                    f"no password for NetHSM user {user!r}; pass password= or set "
                    f"{PASSWORD_ENV} (never put it in the URI)"
                )
            self._primary = same[0]
        else:
            self._primary = Credential(user, Secret(password))
        self.client = Client(
            hosts,
            tls or TLSConfig(),
            timeout=timeout,
            max_connections=max_connections,
            retries=retries,
            backoff=backoff,
        )
        self.description = f"NetHSM {self.client.describe()} as {user!r}"
        self._labels_supported = True
        self.rings = NetHSMRingStore(self)
        #: mechanisms the NetHSM answered "not supported" for (left out of suggestions)
        self._refused: set[Mechanism] = set()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> NetHSM:
        """``nethsm://USER@HOST:PORT[,HOST:PORT...][?fingerprint=sha256:HEX&ca=F&verify=false]``.

        Options: ``password`` (else ``NETHSM_PASSWORD``), ``admin=(user, password)``,
        ``operator=(user, password)``, ``fingerprint``, ``ca``, ``verify``,
        ``timeout`` (seconds or (connect, read)), ``max_connections``, ``retries``,
        ``backoff``. Options override URI parameters.
        """
        parsed = parse_nethsm_uri(uri)
        merged: dict[str, Any] = {}
        for name, value in parsed.params.items():
            if name not in _URI_PARAMS:
                raise ConfigurationError(
                    f"unknown NetHSM URI parameter {name!r}; known: "
                    + ", ".join(sorted(set(_URI_PARAMS)))
                )
            merged[_URI_PARAMS[name]] = value
        merged.update(options)
        known = {
            "password", "admin", "operator", "fingerprint", "ca", "verify", "timeout",
            "max_connections", "retries", "backoff",
        }  # fmt: skip
        unknown = set(merged) - known
        if unknown:
            raise ConfigurationError(
                f"unknown NetHSM option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        tls = TLSConfig.from_options(
            merged.pop("verify", None), merged.pop("ca", None), merged.pop("fingerprint", None)
        )
        for name in ("retries", "max_connections"):
            if name in merged:
                try:
                    merged[name] = int(merged[name])
                except (TypeError, ValueError):
                    raise ConfigurationError(f"{name} must be an integer") from None
        if "backoff" in merged:
            merged["backoff"] = float(merged["backoff"])
        return cls(parsed.hosts, parsed.user, tls=tls, **merged)

    # -- credentials -----------------------------------------------------------------

    def _cred(self, role: str) -> Credential:
        if role == OPERATOR and self._operator is not None:
            return self._operator
        if role == ADMINISTRATOR and self._admin is not None:
            return self._admin
        return self._primary

    def _get(self, path: str, call: Call, **kw: Any) -> Any:
        return self.client.get_json(path, call, self._cred(call.role), **kw)

    # -- key management --------------------------------------------------------------

    def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
        expires_in: timedelta | None = None,
    ) -> NetHSMKey:
        """See :meth:`HSM.generate_key`; ``expires_in`` is stored as a certificate
        (:mod:`.ringstore`), which needs an Administrator too."""
        check_expires_in(expires_in)
        uses, kid, mechanisms = self._prepare(spec, label, usage, key_id)
        body: dict[str, Any] = {"mechanisms": mechanisms, **vocabulary.key_type_body(spec)}
        if kid is not None:
            body["id"] = kid
        call = Call(f"generating a {spec} key {label!r}", ADMINISTRATOR, safe=False, op="generate")
        cred = self._cred(ADMINISTRATOR)

        def send(body: dict[str, Any]) -> str | None:
            return _new_id(self.client.post_json("/keys/generate", call, cred, body))

        new_id, mechanisms = create_performable(
            body, lambda b: self._send_labelled(label, kid, b, send)
        )
        key = NetHSMKey(self, KeyInfo(label, new_id, spec, uses), tuple(mechanisms))
        if expires_in is not None:
            self.rings.write_expiry(key, expiry_of(self, expires_in))
        return key

    def generate_with_id(
        self, spec: KeySpec, key_id: str, label: str, usage: frozenset[str], what: str
    ) -> NetHSMKey:
        """One ``POST /keys/generate`` with the key ID and label given, nothing checked
        first: the NetHSM refuses an ID in use (409, :class:`KeyExists`), the
        compare-and-swap key rings and one-time keys build on."""
        body = {"mechanisms": vocabulary.mechanisms_for(spec, usage),
                **vocabulary.key_type_body(spec), "id": key_id, "label": label}  # fmt: skip
        call = Call(what, ADMINISTRATOR, safe=False, op="generate")
        cred = self._cred(ADMINISTRATOR)
        try:
            _, mechanisms = create_performable(
                body, lambda b: self.client.post_json("/keys/generate", call, cred, b)
            )
        except InvalidInput as exc:
            if vocabulary.refuses_labels(exc.message):
                raise InvalidInput(
                    f"{self.description} has no key labels (NetHSM < 5.0), which key rings and "
                    "one-time keys need"
                ) from None
            raise
        return NetHSMKey(self, KeyInfo(label, key_id, spec, usage), tuple(mechanisms))

    def import_key(
        self,
        private_key: PrivateKeyTypes,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> NetHSMKey:
        """Import an RSA, EC (P-256/384/521) or Ed25519 ``cryptography`` private key; needs an
        Administrator.

        The key is then as good as generated inside (non-extractable), but
        its material existed outside: prefer :meth:`generate_key`.
        """
        spec, private = vocabulary.private_data(private_key)
        uses, kid, mechanisms = self._prepare(spec, label, usage, key_id)
        body: dict[str, Any] = {
            "type": vocabulary.key_type_body(spec)["type"],
            "mechanisms": mechanisms,
            "private": private,
        }
        call = Call(f"importing a {spec} key {label!r}", ADMINISTRATOR, safe=False, op="import")
        cred = self._cred(ADMINISTRATOR)

        def send(body: dict[str, Any]) -> str | None:
            if kid is not None:
                self.client.request("PUT", f"/keys/{kid}", call, cred, body=body)
                return kid
            return _new_id(self.client.post_json("/keys", call, cred, body))

        new_id, mechanisms = create_performable(
            body, lambda b: self._send_labelled(label, kid, b, send)
        )
        return NetHSMKey(self, KeyInfo(label, new_id, spec, uses), tuple(mechanisms))

    def _prepare(
        self, spec: KeySpec, label: str, usage: Iterable[str] | str | None, key_id: str | None
    ) -> tuple[frozenset[str], str | None, list[str]]:
        """Check a new key's label, usage and id: (usage, NetHSM key ID or None, mechanisms).

        The label doubles as the key ID when it is a valid one, so the key is
        found by label even on a NetHSM without labels (before 5.0).
        """
        uses = check_new_key(spec, label, usage)
        kid = vocabulary.check_key_id(key_id) if key_id is not None else None
        if kid is None and vocabulary.is_key_id(label):
            kid = label
        if not vocabulary.label_fits(label) and kid != label:
            raise InvalidInput(
                f"label {label!r} is longer than NetHSM's {vocabulary.MAX_LABEL_BYTES}-byte labels "
                "and is not a valid key ID either; use a shorter label, or one made of letters, "
                "digits, '_', '.' and '-' (then it is also the key ID)"
            )
        if self._find(label):
            raise KeyExists(
                f"a key labelled {label!r} already exists on {self.description}; "
                "choose another label or delete the old key"
            )
        if kid is not None and kid != label and self._fetch(kid) is not None:
            raise KeyExists(f"a key with id {kid!r} already exists on {self.description}")
        return uses, kid, vocabulary.mechanisms_for(spec, uses)

    def _send_labelled(
        self,
        label: str,
        kid: str | None,
        body: dict[str, Any],
        send: Callable[[dict[str, Any]], str | None],
    ) -> str:
        """Create the key with ``label`` in the body, or without it on a NetHSM < 5.0."""
        new_id: str | None = None
        sent = False
        if vocabulary.label_fits(label) and self._labels_supported:
            try:
                new_id, sent = send({**body, "label": label}), True
            except InvalidInput as exc:
                if not vocabulary.refuses_labels(exc.message):
                    raise
                self._labels_supported = False  # a NetHSM before 5.0: the key ID is the label
        if not sent:
            if kid != label:
                raise InvalidInput(
                    f"{self.description} has no key labels (NetHSM < 5.0), so the label must be "
                    f"a valid key ID; {label!r} is not"
                )
            new_id = send(body)
        new_id = new_id or kid
        if not new_id:
            raise HSMError(f"{self.description} created a key but did not say its id")
        return new_id

    def get_key(
        self, label: str | None = None, *, key_id: str | None = None, uri: str | None = None
    ) -> NetHSMKey:
        if uri is not None:
            raise InvalidInput(
                "RFC 7512 URIs name PKCS#11 objects; ask a NetHSM for a key by label or key_id"
            )
        wanted = check_lookup(label, key_id)
        if key_id is not None:
            data = self._fetch(vocabulary.check_key_id(key_id))
            found = [] if data is None else [(key_id, data)]
            if label is not None:
                found = [(i, d) for i, d in found if _label_of(i, d) == label]
        else:
            assert label is not None
            found = self._find(label)
        if not found:
            present = [item["id"] for item in self._key_list()][:20]
            raise KeyNotFound(
                f"no key with {wanted} on {self.description}; key ids present: "
                + (", ".join(repr(k) for k in present) or "none")
            )
        if len(found) > 1:
            raise AmbiguousKey(
                f"{len(found)} keys have {wanted} on {self.description} (ids: "
                + ", ".join(i for i, _ in found)
                + "); ask by key_id or give the keys unique labels"
            )
        kid, data = found[0]
        return self._key(kid, data, wanted)

    def list_keys(self) -> list[KeyInfo]:
        ids = [str(item["id"]) for item in self._key_list()]
        workers = max(1, min(8, self.client.max_connections, len(ids)))
        with ThreadPoolExecutor(workers) as pool:
            fetched = list(pool.map(self._fetch, ids))
        infos = []
        for kid, data in zip(ids, fetched, strict=True):
            if data is None:
                continue  # deleted meanwhile
            info = _info(kid, data)
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda i: (i.label, i.id))

    def ring_store(self) -> NetHSMRingStore:
        return self.rings

    def one_time_store(self) -> NetHSMOneTimeStore:
        from .otkstore import NetHSMOneTimeStore

        return NetHSMOneTimeStore(self)

    def health(self) -> str:
        """The NetHSM's state (``Operational``, ``Locked``, ...) from ``/health/state``."""
        data = self._get("/health/state", Call("reading the state", ANY_USER, safe=True))
        return str(data.get("state", "unknown"))

    # -- helpers -------------------------------------------------------------------------

    def _key_list(self, label: str | None = None) -> list[dict[str, Any]]:
        params = {"label": label} if label is not None else None
        data = self._get("/keys", Call("listing keys", ANY_USER, safe=True), params=params)
        if not isinstance(data, list):
            raise HSMError(f"{self.description} answered the key list with {type(data).__name__}")
        return [item for item in data if isinstance(item, dict) and "id" in item]

    def _fetch(self, key_id: str) -> dict[str, Any] | None:
        """``GET /keys/{id}``, or None when there is no such key."""
        call = Call(f"reading key {key_id!r}", ANY_USER, safe=True, key_id=key_id)
        try:
            data = self._get(f"/keys/{key_id}", call)
        except KeyNotFound:
            return None
        return data if isinstance(data, dict) else None

    def _find(self, label: str) -> list[tuple[str, dict[str, Any]]]:
        """Keys whose label is ``label`` (a key without a label is labelled by its ID)."""
        found: dict[str, dict[str, Any]] = {}
        if vocabulary.is_key_id(label):
            data = self._fetch(label)
            if data is not None and _label_of(label, data) == label:
                found[label] = data
        if not self._labels_supported or not vocabulary.label_fits(label):
            return list(found.items())
        for item in self._key_list(label):
            kid = str(item["id"])
            if kid in found or kid == label:
                continue
            data = self._fetch(kid)
            if data is None:
                continue
            if "label" not in data:
                break  # the server ignored the filter and has no labels: nothing more to find
            if data.get("label") == label:
                found[kid] = data
        return list(found.items())

    def _key(self, kid: str, data: Mapping[str, Any], wanted: str) -> NetHSMKey:
        info = _info(kid, data)
        if info is None:
            raise KeyNotFound(
                f"the key with {wanted} on {self.description} is a {data.get('type')} key, "
                "which hsmbridge does not use; it handles RSA, EC P-256/P-384/P-521 and "
                "Ed25519 keys"
            )
        return NetHSMKey(self, info, tuple(str(m) for m in data.get("mechanisms", ())))

    def close(self) -> None:
        self.client.close()

    @property
    def stats(self) -> dict[str, int]:
        """Request, retry, failover and health-probe counters (a copy)."""
        return dict(self.client.stats)


_T = TypeVar("_T")


def create_performable(
    body: dict[str, Any], create: Callable[[dict[str, Any]], _T]
) -> tuple[_T, list[str]]:
    """``create(body)``; if the server (``hsmbridge serve``) refuses key mechanisms its
    token cannot perform, once more with those of them it can, when they still cover the
    key's usage (SoftHSM2's OAEP has SHA-1 only). (result, mechanisms the key got)."""
    mechanisms: list[str] = body["mechanisms"]
    try:
        return create(body), mechanisms
    except InvalidInput as exc:
        fewer = vocabulary.narrowed(mechanisms, exc.message)
        if fewer is None:
            raise
    return create({**body, "mechanisms": fewer}), fewer


def _new_id(answer: Any) -> str | None:
    """The ``id`` of a CreateResourceId answer."""
    return str(answer["id"]) if isinstance(answer, dict) and answer.get("id") else None


def _label_of(kid: str, data: Mapping[str, Any]) -> str:
    return str(data.get("label") or kid)


def _info(kid: str, data: Mapping[str, Any]) -> KeyInfo | None:
    spec = vocabulary.spec_of(data)
    if spec is None:
        return None
    usage = vocabulary.usage_of(str(m) for m in data.get("mechanisms", ()))
    return KeyInfo(_label_of(kid, data), kid, spec, usage)


class NetHSMKey(Key):
    """A key pair in a NetHSM, addressed by its key ID."""

    def __init__(self, hsm: NetHSM, info: KeyInfo, mechanisms: tuple[str, ...]) -> None:
        super().__init__(info)
        self.hsm = hsm
        self.mechanisms = mechanisms

    def _path(self, suffix: str = "") -> str:
        return f"/keys/{self.id}{suffix}"

    def _fetch_public_key_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        call = Call(
            f"reading the public key of {self.label!r}", ANY_USER, safe=True, key_id=self.id
        )
        try:
            resp = self.hsm.client.request(
                "GET", self._path("/public.pem"), call, self.hsm._cred(ANY_USER),
                accept="application/x-pem-file",
            )  # fmt: skip
            loaded = serialization.load_pem_public_key(resp.data)
            return loaded.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (ValueError, HSMError) as exc:
            if isinstance(exc, HSMError) and exc.status not in (406, 501):
                raise
        return self.public_key_der_from_data()

    def public_key_der_from_data(self) -> bytes:
        """SPKI DER built from the key's ``public`` data (``GET /keys/{id}``)."""
        data = self.hsm._fetch(self.id)
        if data is None:
            raise KeyNotFound(f"key {self.label!r} no longer exists on {self.hsm.description}")
        return vocabulary.public_key_der(self.spec, data.get("public") or {})

    def _offers(self, op: str, besides: Mechanism) -> list[str]:
        """Mechanisms the key allows that the NetHSM has not refused, ``besides`` excluded."""
        refused = {m.value for m in self.hsm._refused} | {besides.value}
        allowed = vocabulary.offered_mechanisms(self.spec, self.mechanisms, sign=op == "sign")
        return [m for m in allowed if m not in refused]

    def _check_usage(self, op: Literal["sign", "decrypt"], mech: Mechanism) -> str:
        require_usage(self.info, mech)
        needed, mode = vocabulary.mode_for(mech)
        if needed not in self.mechanisms:
            offered = self._offers(op, mech)
            raise MechanismNotSupported(
                f"key {self.label!r} on {self.hsm.description} does not allow {mech.value} "
                f"(NetHSM mechanism {needed}); it offers: {', '.join(offered) or 'nothing'}"
            )
        return mode

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
        """One request per item over pooled keep-alive connections, ``threads`` at a time.

        The NetHSM answers ECDSA signatures in DER, converted only when r‖s is asked for.
        """
        raw = isinstance(self.spec, EC) and ecdsa_format == "raw"
        # More threads than pooled connections would only queue on sockets.
        limit = self.hsm.client.max_connections * len(self.hsm.client.instances)
        return run_batch(
            lambda: self._worker(op, mech, raw), items, min(threads, limit), stop_on_error
        )

    @contextlib.contextmanager
    def _worker(self, op: Op, mech: Mechanism, raw_ecdsa: bool) -> Iterator[Operation]:
        mode = self._check_usage(op, mech)
        client = self.hsm.client
        cred = self.hsm._cred(OPERATOR)
        verb = "signing" if op == "sign" else "decryption"
        call = Call(
            f"{verb} ({mech.value}) with key {self.label!r}",
            OPERATOR,
            safe=True,
            key_id=self.id,
            op=op,
            offers=", ".join(self._offers(op, mech)),
        )
        refused = self.hsm._refused
        path = self._path("/" + op)
        spec = self.spec
        field, answer_field = (
            ("message", "signature") if op == "sign" else ("encrypted", "decrypted")
        )
        # RSADP's block is modulus-length (PKCS#11 CKM_RSA_X_509), whatever leading
        # zeros an appliance leaves out
        block = (spec.size + 7) // 8 if mech is Mechanism.RSA_RAW else 0

        def operate(data: bytes) -> bytes:
            if isinstance(spec, EC):
                data = vocabulary.ecdsa_input(data, spec)
            body = {"mode": mode, field: vocabulary.b64encode(data)}
            try:
                answer = client.post_json(path, call, cred, body)
            except MechanismNotSupported:
                refused.add(mech)  # e.g. a bridge on SoftHSM2 has OAEP with SHA-1 only
                raise
            out = vocabulary.b64decode(_member(answer, answer_field), f"the {answer_field} data")
            if raw_ecdsa:
                assert isinstance(spec, EC)
                return ecdsa_der_to_raw(out, spec.field_bytes)
            return out.rjust(block, b"\0")

        yield operate

    def _load_validity(self) -> Validity | None:
        return self.hsm.rings.validity_of(self)

    def _default_threads(self) -> int:
        client = self.hsm.client
        return min(DEFAULT_THREADS, client.max_connections * len(client.instances))

    def _delete(self) -> None:
        call = Call(f"deleting key {self.label!r}", ADMINISTRATOR, safe=False, key_id=self.id)
        self.hsm.client.request("DELETE", self._path(), call, self.hsm._cred(ADMINISTRATOR))

    # -- certificate (``/keys/{id}/cert``) ---------------------------------------------------

    def _cert_request(self, method: str, what: str, role: str, **kw: Any) -> Answer | None:
        """One request on the key's certificate; None when the NetHSM answers 404.

        404 means "no such key" and "no certificate" alike, so a 404 is
        followed by a look at the key, and a missing key raises KeyNotFound.
        """
        call = Call(f"{what} of key {self.label!r}", role, safe=method != "PUT")
        try:
            return self.hsm.client.request(
                method, self._path("/cert"), call, self.hsm._cred(role), **kw
            )
        except HSMError as exc:
            if exc.status != 404:
                raise
        if self.hsm._fetch(self.id) is None:
            raise KeyNotFound(f"key {self.label!r} no longer exists on {self.hsm.description}")
        return None

    def _fetch_certificate_der(self) -> bytes | None:
        from cryptography.hazmat.primitives import serialization

        from ..certificates import load_certificate

        answer = self._cert_request(
            "GET", "reading the certificate", ANY_USER, accept="application/octet-stream"
        )
        if answer is None:
            return None
        return load_certificate(answer.data).public_bytes(serialization.Encoding.DER)

    def _store_certificate(self, cert: x509.Certificate) -> None:
        """PEM, as nitropy and most tools store it (NetHSM keeps the bytes as sent)."""
        from cryptography.hazmat.primitives import serialization

        self._delete_certificate()  # PUT answers 409 while a certificate is stored
        pem = cert.public_bytes(serialization.Encoding.PEM)
        self._cert_request("PUT", "storing the certificate", ADMINISTRATOR, octets=pem)

    def _delete_certificate(self) -> bool:
        answer = self._cert_request("DELETE", "deleting the certificate", ADMINISTRATOR)
        return answer is not None


def _member(answer: Any, name: str) -> Any:
    if not isinstance(answer, dict) or name not in answer:
        raise HSMError(f"the NetHSM's answer has no {name!r} member")
    return answer[name]
