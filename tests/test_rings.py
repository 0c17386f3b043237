"""Key rings and key lifetimes on every backend, with a clock the tests move.

One parametrized suite for PKCS#11 (SoftHSM2) and NetHSM (``hsmbridge serve``
over the same token): the Adyen schedule, activation delay, JWKS at each step,
plain-key expiry and sweeps. Every signature and plaintext is checked with
``cryptography`` against the version's public key.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from clock_fixtures import T0, FakeClock
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import hsmbridge
from hsmbridge import RSA, KeyExpired, KeyNotYetValid

OAEP = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
PSS = padding.PSS(padding.MGF1(hashes.SHA256()), 32)


@pytest.fixture
def ring_name() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


def verify(key: hsmbridge.Key, data: bytes, signature: bytes) -> None:
    public = key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, data, PSS, hashes.SHA256())


def encrypt_to(key: hsmbridge.Key, plaintext: bytes) -> bytes:
    public = key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(plaintext, OAEP)


def kids(ring: hsmbridge.KeyRing) -> list[str]:
    return [k["kid"] for k in ring.jwks()["keys"]]


def test_adyen_schedule(lifecycle_hsm: hsmbridge.HSM, clock: FakeClock, ring_name: str) -> None:
    """Rotate; the old version decrypts and verifies for 24 h, then fails; sweep destroys it."""
    ring = lifecycle_hsm.key_ring(ring_name)
    v1 = ring.rotate(RSA(2048), usage={"sign", "decrypt"})
    assert (v1.version, v1.state, v1.not_before, v1.not_after) == (1, "primary", T0, None)
    key1 = ring.primary
    assert key1.version == 1 and key1.kid == v1.kid == key1.public_key_jwk()["kid"]
    verify(key1, b"m1", ring.sign(b"m1", "rsa-pss-sha256"))
    assert kids(ring) == [v1.kid]
    old_ct = encrypt_to(key1, b"to v1")

    clock.advance(hours=1)
    v2 = ring.rotate(grace=timedelta(hours=24))
    key2 = ring.primary
    assert key2.version == 2 and key2.spec == RSA(2048) and key2.info.usage == key1.info.usage
    deadline = T0 + timedelta(hours=25)
    assert [(v.version, v.state, v.not_after) for v in ring.versions()] == [
        (1, "grace", deadline),
        (2, "primary", None),
    ]
    assert ring.primary.not_before == T0 + timedelta(hours=1)
    assert kids(ring) == [v2.kid, v1.kid]
    verify(key2, b"m2", ring.sign(b"m2", "rsa-pss-sha256"))
    new_ct = encrypt_to(key2, b"to v2")
    for ct, kid, plain in ((old_ct, v1.kid, b"to v1"), (new_ct, v2.kid, b"to v2")):
        assert ring.decrypt(ct, "rsa-oaep-sha1", kid=kid) == plain
        assert ring.decrypt(ct, "rsa-oaep-sha1") == plain
    assert '"public_key"' in ring.upload_json() and key2.public_key_pem().rstrip()[:60] in (
        ring.upload_json().replace("\\n", "\n")
    )

    clock.now = deadline - timedelta(seconds=1)
    assert ring.decrypt(old_ct, "rsa-oaep-sha1", kid=v1.kid) == b"to v1"
    verify(key1, b"late", ring.version(1).sign(b"late", "rsa-pss-sha256"))

    clock.now = deadline
    with pytest.raises(KeyExpired, match=rf"version 1 of ring '{ring_name}' expired at 2026-12-02"):
        ring.decrypt(old_ct, "rsa-oaep-sha1", kid=v1.kid)
    with pytest.raises(hsmbridge.DecryptionFailed, match=r"tried 2\)"):
        ring.decrypt(old_ct, "rsa-oaep-sha1")
    assert ring.decrypt(new_ct, "rsa-oaep-sha1") == b"to v2"
    assert kids(ring) == [v2.kid]
    assert [v.state for v in ring.versions()] == ["expired", "primary"]

    swept = ring.sweep()
    assert [(v.version, v.kid, v.state) for v in swept] == [(1, v1.kid, "expired")]
    assert [v.version for v in ring.versions()] == [2]
    assert v1.key_id not in {k.id for k in lifecycle_hsm.list_keys()}
    with pytest.raises(KeyExpired, match="destroyed by a sweep"):
        ring.decrypt(old_ct, "rsa-oaep-sha1", kid=v1.kid)
    with pytest.raises(KeyExpired, match="destroyed by a sweep"):
        ring.version(1)
    assert ring.sweep() == []
    # another handle (another process would be the same) sees the same ring
    other = lifecycle_hsm.key_ring(ring_name)
    assert other.primary.kid == v2.kid
    assert ring_name in [r.name for r in lifecycle_hsm.key_rings()]


def test_activation_delay(lifecycle_hsm: hsmbridge.HSM, clock: FakeClock, ring_name: str) -> None:
    """A version rotated with activate_in is published (JWKS) at once and primary later."""
    ring = lifecycle_hsm.key_ring(ring_name)
    v1 = ring.rotate(RSA(2048), usage="sign")
    v2 = ring.rotate(grace=timedelta(hours=24), activate_in=timedelta(minutes=5))
    assert v2.state == "pending" and v2.not_before == T0 + timedelta(minutes=5)
    assert ring.primary.version == 1
    assert ring.primary.not_after == T0 + timedelta(minutes=5, hours=24)
    assert kids(ring) == [v2.kid, v1.kid]
    with pytest.raises(KeyNotYetValid, match=r"not valid before 2026-12-01T12:05:00"):
        ring.version(2).sign(b"early", "rsa-pss-sha256")
    verify(ring.version(1), b"m", ring.sign(b"m", "rsa-pss-sha256"))

    clock.advance(minutes=5)
    assert ring.primary.version == 2
    verify(ring.version(2), b"m", ring.sign(b"m", "rsa-pss-sha256"))
    assert [v.state for v in ring.versions()] == ["grace", "primary"]
    clock.advance(hours=24)
    assert [v.state for v in ring.versions()] == ["expired", "primary"]
    assert kids(ring) == [v2.kid]
    assert [v.version for v in ring.sweep()] == [1]


def test_no_kid_decryption_is_oaep_only(lifecycle_hsm: hsmbridge.HSM, ring_name: str) -> None:
    ring = lifecycle_hsm.key_ring(ring_name)
    v1 = ring.rotate(RSA(2048), usage="decrypt")
    public = ring.primary.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    ct = public.encrypt(b"v15", padding.PKCS1v15())
    with pytest.raises(hsmbridge.InvalidInput, match=r"padding oracle.*pass kid="):
        ring.decrypt(ct, "rsa-pkcs1", allow_pkcs1v15=True)
    if isinstance(lifecycle_hsm, hsmbridge.pkcs11.Pkcs11HSM):  # the bridge keys lack v1.5
        assert ring.decrypt(ct, "rsa-pkcs1", kid=v1.kid, allow_pkcs1v15=True) == b"v15"
    with pytest.raises(hsmbridge.KeyNotFound, match="no version with kid"):
        ring.decrypt(ct, "rsa-oaep-sha1", kid="not-a-kid")


def test_plain_key_expiry(lifecycle_hsm: hsmbridge.HSM, clock: FakeClock, ring_name: str) -> None:
    key = lifecycle_hsm.generate_key(
        RSA(2048), label=ring_name, usage={"decrypt"}, expires_in=timedelta(minutes=15)
    )
    assert key.not_after == T0 + timedelta(minutes=15)
    ct = encrypt_to(key, b"short-lived")
    assert key.decrypt(ct, "rsa-oaep-sha1") == b"short-lived"
    found = lifecycle_hsm.get_key(ring_name)  # read back from the HSM, not from ``key``
    assert found.not_after == T0 + timedelta(minutes=15) and found.not_before is None
    forever = lifecycle_hsm.generate_key(RSA(2048), label=ring_name + "x", usage="decrypt")
    assert lifecycle_hsm.get_key(ring_name + "x").validity is None

    clock.advance(minutes=15)
    for k in (key, found):
        with pytest.raises(KeyExpired, match=rf"key '{ring_name}' expired at 2026-12-01T12:15"):
            k.decrypt(ct, "rsa-oaep-sha1")
        with pytest.raises(KeyExpired):  # the whole batch, before the HSM is asked
            k.decrypt_batch([ct], "rsa-oaep-sha1", return_exceptions=True)
    # the token is shared: other tests' rings and keys expire at this clock's times too
    assert ring_name in [v.label for v in lifecycle_hsm.sweep(dry_run=True)]
    assert lifecycle_hsm.get_key(ring_name).id == key.id  # dry run: still there
    swept = [(v.label, v.version) for v in lifecycle_hsm.sweep()]
    assert (ring_name, None) in swept and (ring_name + "x", None) not in swept
    with pytest.raises(hsmbridge.KeyNotFound):
        lifecycle_hsm.get_key(ring_name)
    assert lifecycle_hsm.get_key(ring_name + "x").id == forever.id
    forever.delete()


def test_misuse_is_explained(lifecycle_hsm: hsmbridge.HSM, ring_name: str) -> None:
    ring = lifecycle_hsm.key_ring(ring_name)
    with pytest.raises(hsmbridge.KeyNotFound, match="has no versions"):
        _ = ring.primary
    with pytest.raises(hsmbridge.InvalidInput, match="first rotate needs a key spec"):
        ring.rotate()
    with pytest.raises(hsmbridge.InvalidInput, match="ring name"):
        lifecycle_hsm.key_ring("no spaces")
    with pytest.raises(hsmbridge.InvalidInput, match="grace must be"):
        ring.rotate(RSA(2048), grace=timedelta(seconds=-1))
    with pytest.raises(hsmbridge.InvalidInput, match="expires_in must be"):
        lifecycle_hsm.generate_key(RSA(2048), label=ring_name, expires_in=timedelta(0))
    assert ring.versions() == []


def test_a_rotation_bounds_every_older_version(
    lifecycle_hsm: hsmbridge.HSM, clock: FakeClock, ring_name: str
) -> None:
    """Each version ends at the earliest deadline a later rotation set: a longer grace
    later does not revive a version, and a rotation without grace ends them all."""
    ring = lifecycle_hsm.key_ring(ring_name)
    ring.rotate(hsmbridge.EC("P-256"), usage="sign")
    ring.rotate(grace=timedelta(hours=24))
    clock.advance(hours=1)
    ring.rotate(grace=timedelta(hours=48))
    assert [(v.state, v.not_after) for v in ring.versions()] == [
        ("grace", T0 + timedelta(hours=24)),
        ("grace", T0 + timedelta(hours=49)),
        ("primary", None),
    ]
    clock.advance(hours=1)
    v4 = ring.rotate()  # compromised: no grace
    assert [v.state for v in ring.versions()] == ["expired"] * 3 + ["primary"]
    assert [v.version for v in ring.sweep()] == [1, 2, 3]
    assert [v.kid for v in ring.versions()] == [v4.kid] == kids(ring)
