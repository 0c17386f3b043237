"""One-time keys (hsmbridge.onetime) on a clock the tests move: issue, decrypt once,
second use refused, expiry at 15 minutes, sweep; the pool, its exhaustion and close.

Encryption and verification are jwcrypto's (an independent JOSE library), and
every plaintext is checked. RSA-1024 keeps key generation quick here; the
interop test in test_conformance.py uses RSA-2048 with every alg/enc pair.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from clock_fixtures import T0, FakeClock
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwcrypto import jwe, jwk, jws

import hsmbridge
from hsmbridge import RSA, InvalidInput, KeyExpired, KeyNotFound, PoolExhausted
from hsmbridge.onetime import OneTimeKeys
from hsmbridge.pkcs11.otkstore import TICKET_PREFIX
from hsmbridge.pkcs11.ringstore import read_data

CARD = b'{"number":"4111111111111111","securityCode":"123"}'


def pool_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def browser_encrypts(public_jwk: dict[str, Any], plaintext: bytes, enc: str = "A256GCM") -> str:
    """What the browser does with the JWK: a compact JWE made by jwcrypto."""
    token = jwe.JWE(
        plaintext, protected={"alg": public_jwk["alg"], "enc": enc, "kid": public_jwk["kid"]}
    )
    token.add_recipient(jwk.JWK(**public_jwk))
    return str(token.serialize(compact=True))


def verified_claims(context: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """The context JWT's claims once jwcrypto verified its signature with the signer's JWKS
    (the fake clock's times are in the past, so exp is checked by the test, not here)."""
    token = jws.JWS()
    token.deserialize(context)
    token.verify(jwk.JWKSet.from_json(json.dumps(jwks)))
    return json.loads(token.payload)  # type: ignore[no-any-return]


def test_issue_decrypt_once_expire_sweep(lifecycle_hsm: hsmbridge.HSM, clock: FakeClock) -> None:
    hsm = lifecycle_hsm
    ring = hsm.key_ring(pool_name())
    ring.rotate(RSA(2048), usage="sign")
    with hsm.one_time_keys(
        RSA(1024), ttl=timedelta(minutes=15), pool=2, signer=ring, alg="RSA-OAEP", name=pool_name()
    ) as otk:
        k = otk.issue()
        assert k.expires_at == T0 + timedelta(minutes=15)
        assert k.jwk["kid"] == k.kid and k.jwk["use"] == "enc" and k.jwk["alg"] == "RSA-OAEP"
        assert k.jwk["kty"] == "RSA" and set(k.jwk) == {"kty", "n", "e", "kid", "use", "alg"}
        claims = verified_claims(k.context or "", ring.jwks())
        assert claims["jwk"] == k.jwk and claims["jti"] == k.kid
        assert claims["exp"] == int(k.expires_at.timestamp()) and claims["iat"] == int(
            T0.timestamp()
        )

        token = browser_encrypts(k.jwk, CARD)
        assert otk.decrypt_jwe(token) == CARD
        with pytest.raises(KeyExpired, match=f"one-time key {k.kid} was already used"):
            otk.decrypt_jwe(token)
        with pytest.raises(KeyNotFound):  # destroyed in the HSM right after the decrypt
            hsm.get_key(
                key_id=k.kid
                if "pkcs11" in type(hsm).__name__.lower()
                else f"otk.{otk.name}.{k.kid}"
            )
        with pytest.raises(KeyExpired, match="already used"):  # another handle knows too
            fresh_view(hsm, otk).decrypt_jwe(token)

        late, later = otk.issue(), otk.issue()
        late_token = browser_encrypts(late.jwk, CARD, enc="A128CBC-HS256")
        later_token = browser_encrypts(later.jwk, b"in time")
        clock.advance(minutes=15, seconds=-1)
        assert otk.decrypt_jwe(later_token) == b"in time"  # 14:59 after issue: still valid
        clock.advance(seconds=1)
        with pytest.raises(
            KeyExpired, match=f"one-time key {late.kid} expired at 2026-12-01T12:15"
        ):
            otk.decrypt_jwe(late_token)

        gone = otk.sweep()
        assert {k.kid, late.kid, later.kid} <= set(gone)
        with pytest.raises(KeyExpired, match="destroyed by a sweep"):
            otk.decrypt_jwe(late_token)
        with pytest.raises(KeyNotFound, match=f"no one-time key with kid {late.kid}"):
            fresh_view(hsm, otk).decrypt_jwe(late_token)
        assert otk.sweep() == []  # nothing left to do
        stats = otk.stats()
        assert stats["issued"] == 3 and stats["decrypted"] == 2
        assert stats["expired"] == 1 and stats["refused"] == 3
        assert stats["pool_target"] == 2 and stats["refill_per_second"] > 0


def fresh_view(hsm: hsmbridge.HSM, otk: OneTimeKeys) -> OneTimeKeys:
    """Another handle on the same pool name (as another process would have), pool of one."""
    other = hsm.one_time_keys(otk.spec, pool=1, alg=otk.alg, name=otk.name)
    other.close()  # decrypting needs no pool
    return other


def test_raw_oaep_decrypt_v1_style(lifecycle_hsm: hsmbridge.HSM) -> None:
    """Flex v1: the browser encrypts with RSA-OAEP itself, base64, no JWE."""
    with lifecycle_hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=pool_name()) as otk:
        k = otk.issue()
        assert k.context is None  # no signer
        public = jwk.JWK(**k.jwk).get_op_key("encrypt")
        assert isinstance(public, rsa.RSAPublicKey)
        oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        ciphertext = public.encrypt(b"4111111111111111", oaep)
        with pytest.raises(InvalidInput, match="RSA-OAEP only"):
            otk.decrypt(k.kid, ciphertext, "rsa-pkcs1")
        with pytest.raises(InvalidInput, match="takes 128-byte"):
            otk.decrypt(k.kid, ciphertext[:-1], "rsa-oaep-sha1")
        assert otk.decrypt(k.kid, ciphertext, "rsa-oaep-sha1") == b"4111111111111111"
        with pytest.raises(KeyExpired, match="already used"):
            otk.decrypt(k.kid, ciphertext, "rsa-oaep-sha1")


def test_unknown_and_malformed_kids(lifecycle_hsm: hsmbridge.HSM) -> None:
    with lifecycle_hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=pool_name()) as otk:
        k = otk.issue()
        unknown = uuid.uuid4().hex
        with pytest.raises(KeyNotFound, match=f"no one-time key with kid {unknown} was issued"):
            otk.decrypt(unknown, b"\0" * 128, "rsa-oaep-sha1")
        with pytest.raises(KeyNotFound, match="not a one-time key id"):
            otk.decrypt("../x", b"\0" * 128, "rsa-oaep-sha1")
        token = browser_encrypts({**k.jwk, "kid": unknown}, CARD)
        with pytest.raises(KeyNotFound, match=unknown):
            otk.decrypt_jwe(token)
        wrong_alg = browser_encrypts({**k.jwk, "alg": "RSA-OAEP-256"}, CARD)
        with pytest.raises(InvalidInput, match="issues keys for RSA-OAEP"):
            otk.decrypt_jwe(wrong_alg)  # refused before the key is used up
        assert otk.decrypt_jwe(browser_encrypts(k.jwk, CARD)) == CARD
        # a pool key never issued does not decrypt, in this process or any other
        otk_other = lifecycle_hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=otk.name)
        otk_other.fill()
        pooled = otk_other._pool[0]
        with pytest.raises(KeyNotFound, match="was issued"):
            otk.decrypt_jwe(browser_encrypts(pooled.jwk, CARD))
        otk_other.close()


def test_failed_decrypt_uses_the_key_up(lifecycle_hsm: hsmbridge.HSM) -> None:
    """A tampered token fails (no oracle) and the key is gone: no second try."""
    with lifecycle_hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=pool_name()) as otk:
        k = otk.issue()
        parts = browser_encrypts(k.jwk, CARD).split(".")
        parts[3] = parts[3][:-2] + ("AA" if parts[3][-2:] != "AA" else "BB")
        with pytest.raises(hsmbridge.DecryptionFailed) as failed:
            otk.decrypt_jwe(".".join(parts))
        assert "4111" not in str(failed.value)
        with pytest.raises(KeyExpired, match="already used"):
            otk.decrypt_jwe(browser_encrypts(k.jwk, CARD))


def test_pool_exhaustion_says_what_to_raise(softhsm_token: Any) -> None:
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    with hsm.one_time_keys(
        RSA(1024), pool=1, alg="RSA-OAEP", name=pool_name(), wait=timedelta(0)
    ) as otk:
        otk.fill()
        otk.issue()
        with pytest.raises(PoolExhausted) as exhausted:
            otk.issue()
        message = str(exhausted.value)
        assert "keys/s with 1 thread(s)" in message
        assert "raise pool= (now 1)" in message and "refill_threads= (now 1)" in message
    hsm.close()


def test_close_destroys_pool_keys_never_issued(softhsm_token: Any) -> None:
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    name = pool_name()
    tickets_before = tickets(hsm)
    otk = hsm.one_time_keys(RSA(1024), pool=3, alg="RSA-OAEP", name=name)
    issued = otk.issue()
    otk.fill()
    otk.close()
    labels = [info.label for info in hsm.list_keys() if info.label.startswith(f"otk.{name}.")]
    assert len(labels) == 1 and issued.kid in labels[0]  # only the issued key stays
    # and only its ticket: the pool keys' tickets went with them
    assert tickets(hsm) == tickets_before | {TICKET_PREFIX + issued.kid}
    assert otk.stats()["pool_size"] == 0
    with pytest.raises(InvalidInput, match="closed"):
        otk.issue()
    other = hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=name)
    assert other.decrypt_jwe(browser_encrypts(issued.jwk, CARD)) == CARD  # still decrypts
    other.close()
    hsm.close()


def test_alg_choice_is_explicit_where_the_token_lacks_oaep_sha256(softhsm_token: Any) -> None:
    """SoftHSM2 has OAEP with SHA-1 only (docs/design.md, fact 6): never silently another hash."""
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    with pytest.raises(hsmbridge.MechanismNotSupported, match="pass alg='RSA-OAEP'"):
        hsm.one_time_keys(RSA(2048))
    with pytest.raises(hsmbridge.MechanismNotSupported, match="cannot decrypt RSA-OAEP-256"):
        hsm.one_time_keys(RSA(2048), alg="RSA-OAEP-256")
    with pytest.raises(InvalidInput, match="RSA keys"):
        hsm.one_time_keys(hsmbridge.EC("P-256"), alg="RSA-OAEP")
    with pytest.raises(InvalidInput, match="ttl"):
        hsm.one_time_keys(RSA(2048), alg="RSA-OAEP", ttl=timedelta(days=30))
    with pytest.raises(InvalidInput, match="pool name"):
        hsm.one_time_keys(RSA(2048), alg="RSA-OAEP", name="a.b")
    hsm.close()


def test_nethsm_never_issues_a_key_it_cannot_decrypt_with(nethsm_hsm: hsmbridge.HSM) -> None:
    """A NetHSM cannot list its mechanisms in advance, and hsmbridge serve over SoftHSM2
    gives keys OAEP-SHA1 only: a pool for RSA-OAEP-256 says so instead of issuing."""
    with nethsm_hsm.one_time_keys(
        RSA(1024), pool=1, alg="RSA-OAEP-256", name=pool_name(), wait=timedelta(seconds=3)
    ) as otk:
        with pytest.raises(
            PoolExhausted, match=r"fails: .* decrypt only rsa-oaep-sha1.* not rsa-oaep-sha256"
        ):
            otk.issue()
        assert otk.stats()["issued"] == 0


def tickets(hsm: Any) -> set[str]:
    """The labels of the one-time-key tickets in the token."""
    with hsm.pool.admin() as session:
        return {d.label for d in read_data(session) if d.label.startswith(TICKET_PREFIX)}


def test_a_stale_cached_ticket_falls_back_to_the_token(softhsm_token: Any) -> None:
    """The ticket this process wrote is destroyed through its cached object; if that
    fails (its session was reopened, say), the claim finds the ticket in the token
    instead of reporting the key as already used."""
    import pkcs11.exceptions as p11x

    class Stale:
        def destroy(self) -> None:
            raise p11x.SessionHandleInvalid()

    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    with hsm.one_time_keys(RSA(1024), pool=1, alg="RSA-OAEP", name=pool_name()) as otk:
        k = otk.issue()
        otk._store._tickets[k.kid] = Stale()  # type: ignore[attr-defined]
        assert otk.decrypt_jwe(browser_encrypts(k.jwk, CARD)) == CARD
    hsm.close()
