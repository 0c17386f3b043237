"""Key-ring versions and key lifetimes in a NetHSM, with the API's own objects.

- A ring version is one key: key ID ``ring.NAME.VERSION`` and label
  ``ring@NOT_BEFORE+GRACE`` (Unix seconds; at most 31 bytes, within NetHSM
  5.0's 32-byte labels). Both are set by the one ``POST /keys/generate``
  request that creates the key, so a version appears complete or not at all,
  and because key IDs are unique the NetHSM itself refuses a second
  version N (409): that is the compare-and-swap two rotating processes need.
  Nothing else is ever written: the ring is the set of its keys.
- A plain key made with ``expires_in`` carries its end of life as an X.509
  certificate on the key (``PUT /keys/{id}/cert``): subject ``CN=hsmbridge
  expiry``, the key's own public key, ``notAfter`` the instant it expires,
  signed by a throwaway key (it asserts nothing but the date). A validity
  period is what a certificate is for, every NetHSM client shows it, and it
  leaves labels and tags (tags restrict which operators may use a key) alone.
  It is a second request after the key's, so a process killed between them
  leaves a key without an end of life that was never handed to anyone.

Needs key labels (NetHSM 5.0 or ``hsmbridge serve``).
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..api import Key, KeySpec, Validity
from ..errors import HSMError, KeyExists, KeyNotFound
from ..rings import RingStore, VersionRecord, expiry_validity, version_label
from .errors import ADMINISTRATOR, ANY_USER, Call

if TYPE_CHECKING:
    from .backend import NetHSM, NetHSMKey

_ID_RE = re.compile(r"ring\.([a-zA-Z0-9][a-zA-Z0-9_-]{0,63})\.([1-9][0-9]{0,8})")
_LABEL_RE = re.compile(r"ring@([0-9]{1,12})\+([0-9]{1,9})")
EXPIRY_SUBJECT = "hsmbridge expiry"


def version_key_id(ring: str, version: int) -> str:
    return f"ring.{ring}.{version}"


class NetHSMRingStore(RingStore):
    def __init__(self, hsm: NetHSM) -> None:
        self.hsm = hsm
        self._labels: dict[str, str] = {}  # key ID -> label (version labels never change)

    def records(self, ring: str | None = None) -> list[VersionRecord]:
        out = []
        for item in self.hsm._key_list():
            match = _ID_RE.fullmatch(str(item["id"]))
            if match is None or (ring is not None and match[1] != ring):
                continue
            key_id = match[0]
            label = self._labels.get(key_id)
            if label is None:
                data = self.hsm._fetch(key_id)
                if data is None:
                    continue  # deleted meanwhile
                label = self._labels[key_id] = str(data.get("label", ""))
            times = _LABEL_RE.fullmatch(label)
            if times is not None:
                out.append(
                    VersionRecord(match[1], int(match[2]), int(times[1]), int(times[2]), key_id)
                )
        return out

    def may_have(self, ring: str, version: int) -> bool:
        """One ``GET /keys/ring.NAME.VERSION``."""
        return self.hsm._fetch(version_key_id(ring, version)) is not None

    def create_version(self, record: VersionRecord, spec: KeySpec, usage: frozenset[str]) -> Key:
        key_id = version_key_id(record.ring, record.version)
        label = f"ring@{record.not_before}+{record.grace}"
        name = version_label(record.ring, record.version)
        try:
            key = self.hsm.generate_with_id(spec, key_id, label, usage, f"generating {name}")
        except KeyExists:
            raise KeyExists(
                f"version {record.version} of ring {record.ring!r} was just created by another "
                "process (a concurrent rotation); read ring.versions() and rotate again if needed"
            ) from None
        self._labels[key_id] = label
        return key

    def version_key(self, record: VersionRecord) -> Key:
        return self.hsm.get_key(key_id=record.key_id)

    def destroy_version(self, record: VersionRecord) -> None:
        with contextlib.suppress(KeyNotFound):
            self.hsm.get_key(key_id=record.key_id).delete()
        self._labels.pop(record.key_id, None)

    # -- plain keys' lifetimes -------------------------------------------------------------

    def write_expiry(self, key: NetHSMKey, not_after: datetime) -> None:
        """Put the expiry certificate on a key just made; delete the key if that fails."""
        try:
            cert = _expiry_certificate(key.public_key(), not_after)
            call = Call(
                f"storing the end of life of {key.label!r}", ADMINISTRATOR, safe=False,
                key_id=key.id,
            )  # fmt: skip
            self.hsm.client.request(
                "PUT", f"/keys/{key.id}/cert", call, self.hsm._cred(ADMINISTRATOR),
                content=("application/x-pem-file", cert),
            )  # fmt: skip
        except HSMError:
            with contextlib.suppress(HSMError):
                key.delete()
            raise
        key.validity = expiry_validity(self.hsm, key.label, not_after)

    def validity_of(self, key: NetHSMKey) -> Validity | None:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        call = Call(f"reading the certificate of {key.label!r}", ANY_USER, safe=True)
        try:
            answer = self.hsm.client.request(
                "GET", f"/keys/{key.id}/cert", call, self.hsm._cred(ANY_USER),
                accept="application/octet-stream",
            )  # fmt: skip
        except HSMError as exc:
            if exc.status in (404, 406):
                return None  # no certificate
            raise
        data = bytes(answer.data)
        try:
            cert = (
                x509.load_pem_x509_certificate(data)
                if data.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(data)
            )
        except ValueError:
            return None  # someone else's certificate
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [EXPIRY_SUBJECT]:
            return None
        return expiry_validity(self.hsm, key.label, cert.not_valid_after_utc)

    def expiring_keys(self) -> list[Key]:
        keys: list[Key] = []
        for info in self.hsm.list_keys():
            if _ID_RE.fullmatch(info.id):
                continue
            with contextlib.suppress(KeyNotFound):
                key = self.hsm.get_key(key_id=info.id)
                if key.validity is not None:
                    keys.append(key)
        return keys

    def destroy_key(self, key: Key) -> None:
        key.delete()


def _expiry_certificate(public_key: Any, not_after: datetime) -> bytes:
    """A certificate for ``public_key`` valid until ``not_after``, signed by a throwaway key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    signer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, EXPIRY_SUBJECT)])
    start = min(datetime.now(UTC), not_after) - timedelta(seconds=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
