"""What the official NetHSM SDK (PyPI ``nethsm``) sees of hsmbridge's key rings and
key lifetimes on ``hsmbridge serve``: plain keys with IDs, labels and certificates."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nethsm_fixtures import open_nethsm

from hsmbridge import RSA
from hsmbridge.nethsm import NetHSM
from hsmbridge.server.testing import BridgeServer

pytest_plugins = ["server_fixtures"]


@pytest.fixture(scope="module")
def hsm(bridge_server: BridgeServer) -> Iterator[NetHSM]:
    handle = open_nethsm(bridge_server)
    yield handle
    handle.close()


def test_ring_versions_are_keys_with_schedule_labels(
    bridge_server: BridgeServer, hsm: NetHSM
) -> None:
    with contextlib.closing(bridge_server.sdk("admin")) as sdk:
        _ring_versions_seen_by(sdk, hsm)


def test_expiry_is_a_certificate_the_sdk_reads(bridge_server: BridgeServer, hsm: NetHSM) -> None:
    with contextlib.closing(bridge_server.sdk("admin")) as sdk:
        _expiry_seen_by(sdk, hsm)


def _ring_versions_seen_by(sdk: Any, hsm: NetHSM) -> None:
    name = f"s{uuid.uuid4().hex[:10]}"
    ring = hsm.key_ring(name)
    v1 = ring.rotate(RSA(2048), usage={"sign", "decrypt"})
    v2 = ring.rotate(grace=timedelta(hours=24), activate_in=timedelta(minutes=5))
    ids = sdk.list_keys()
    assert f"ring.{name}.1" in ids and f"ring.{name}.2" in ids
    assert (v1.key_id, v2.key_id) == (f"ring.{name}.1", f"ring.{name}.2")
    seen = sdk.get_key(v2.key_id)
    start = int(v2.not_before.timestamp()) if v2.not_before else 0
    assert seen.label == f"ring@{start}+86400"
    assert seen.tags == []  # tags would restrict operators: left alone
    pem = sdk.get_key_public_key(v2.key_id)
    assert (
        serialization.load_pem_public_key(pem.encode()).public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == ring.version(2).public_key_der()
    )
    # the ring is the set of its keys: a version deleted by another client is gone
    sdk.delete_key(v2.key_id)
    assert [v.version for v in hsm.key_ring(name).versions()] == [1]


def _expiry_seen_by(sdk: Any, hsm: NetHSM) -> None:
    label = f"e{uuid.uuid4().hex[:10]}"
    key = hsm.generate_key(RSA(2048), label, usage="decrypt", expires_in=timedelta(minutes=15))
    cert = x509.load_pem_x509_certificate(sdk.get_key_certificate(key.id))
    assert cert.subject.rfc4514_string() == "CN=hsmbridge expiry"
    assert key.not_after == cert.not_valid_after_utc
    assert abs(cert.not_valid_after_utc - datetime.now(UTC) - timedelta(minutes=15)) < timedelta(
        seconds=5
    )
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == key.public_key_der()
    )
    key.delete()
