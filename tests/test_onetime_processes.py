"""One-time keys across real processes (multiprocessing, spawn) sharing one SoftHSM2
token: a key issued in one process decrypts in another, once; two processes
issuing at once never hand out the same key; two racing decrypts never both
succeed; SIGKILL at random points loses no issued key and makes none usable twice."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import otk_worker
import pytest
from jwcrypto import jwe, jwk

import hsmbridge
from hsmbridge import KeyExpired
from hsmbridge.testing import SoftToken

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def token_hsm(softhsm_token: SoftToken) -> Iterator[hsmbridge.HSM]:
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    yield hsm
    hsm.close()


def pool_name() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


def encrypt(public_jwk: dict[str, Any], plaintext: bytes) -> str:
    token = jwe.JWE(
        plaintext, protected={"alg": public_jwk["alg"], "enc": "A256GCM", "kid": public_jwk["kid"]}
    )
    token.add_recipient(jwk.JWK(**public_jwk))
    return str(token.serialize(compact=True))


def read(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def run(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def wait_for(out: Path, key: str, count: int = 1, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(key in line for line in read(out)) < count:
        assert time.monotonic() < deadline, f"no {key!r} from the worker in {timeout} s"
        time.sleep(0.02)


def test_issued_in_one_process_decrypts_once_in_another(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM, tmp_path: Path
) -> None:
    name = pool_name()
    with token_hsm.one_time_keys(otk_worker.SPEC, pool=2, alg=otk_worker.ALG, name=name) as otk:
        keys = [otk.issue(), otk.issue()]
        tokens = [encrypt(k.jwk, f"card {i}".encode()) for i, k in enumerate(keys)]
        out = tmp_path / "decrypt.jsonl"
        proc = run(
            otk_worker.decrypt,
            softhsm_token.uri,
            {"pin": softhsm_token.pin},
            name,
            tokens[:1],
            0.0,
            str(out),
        )
        proc.join(60)
        assert proc.exitcode == 0
        assert [r["plaintext"] for r in read(out) if "plaintext" in r] == ["card 0"]
        with pytest.raises(KeyExpired, match="already used"):  # the other process used it
            otk.decrypt_jwe(tokens[0])
        assert otk.decrypt_jwe(tokens[1]) == b"card 1"  # here, the other key


def test_two_processes_issuing_at_once_never_share_a_key(
    softhsm_token: SoftToken, tmp_path: Path
) -> None:
    name, start = pool_name(), time.time() + 4.0  # both pools are warm by then
    outs = [tmp_path / f"issue{i}.jsonl" for i in range(2)]
    procs = [
        run(
            otk_worker.issue,
            softhsm_token.uri,
            {"pin": softhsm_token.pin},
            name,
            6,
            start,
            str(out),
        )
        for out in outs
    ]
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    kids = [[r["issued"] for r in read(out)] for out in outs]
    assert len(kids[0]) == len(kids[1]) == 6
    assert not set(kids[0]) & set(kids[1])
    moduli = [r["jwk"]["n"] for out in outs for r in read(out)]
    assert len(set(moduli)) == 12


@pytest.fixture(params=["pkcs11", "nethsm"])
def shared(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[hsmbridge.HSM, str, dict[str, Any]]]:
    """(a handle, the URI and open() options another process uses) on each backend."""
    if request.param == "pkcs11":
        token: SoftToken = request.getfixturevalue("softhsm_token")
        hsm = hsmbridge.open(token.uri, pin=token.pin)
        yield hsm, token.uri, {"pin": token.pin}
    else:
        from nethsm_fixtures import bridge_of, open_nethsm

        bridge = bridge_of(request.getfixturevalue("nethsm_hsm"))
        hsm = open_nethsm(bridge)
        options = {
            "password": bridge.admin.passphrase,
            "operator": bridge.operator.auth,
            "fingerprint": bridge.fingerprint,
        }
        yield hsm, f"nethsm://{bridge.admin.user}@{bridge.hostport}", options
    hsm.close()


def test_racing_decrypts_never_both_succeed(
    shared: tuple[hsmbridge.HSM, str, dict[str, Any]], tmp_path: Path
) -> None:
    """Three processes decrypt the same six tokens at the same moment."""
    name = pool_name()
    token_hsm, uri, options = shared
    with token_hsm.one_time_keys(otk_worker.SPEC, pool=6, alg=otk_worker.ALG, name=name) as otk:
        keys = [otk.issue() for _ in range(6)]
        tokens = [encrypt(k.jwk, k.kid.encode()) for k in keys]
        start = time.time() + 4.0
        outs = [tmp_path / f"race{i}.jsonl" for i in range(3)]
        procs = [
            run(otk_worker.decrypt, uri, options, name, tokens, start, str(out)) for out in outs
        ]
        for proc in procs:
            proc.join(120)
            assert proc.exitcode == 0
        results = [r for out in outs for r in read(out) if "kid" in r]
        assert len(results) == 18
        for k in keys:
            mine = [r for r in results if r["kid"] == k.kid]
            won = [r for r in mine if "plaintext" in r]
            assert len(won) <= 1, mine  # never decrypted twice
            assert all(r["plaintext"] == k.kid for r in won)
            assert all(r.get("error") == "KeyExpired" for r in mine if r not in won), mine
        assert any("plaintext" in r for r in results)
        for token in tokens:  # and nobody decrypts them afterwards
            with pytest.raises(KeyExpired, match="already used"):
                otk.decrypt_jwe(token)


def test_sigkill_while_issuing_loses_no_issued_key(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM, tmp_path: Path
) -> None:
    """Kill an issuing process at random points; every key it reported decrypts, once,
    here; a key it never reported (killed mid-issue) is never handed out by anyone."""
    name = pool_name()
    rng = random.Random()
    reported: list[dict[str, Any]] = []
    for round_ in range(3):
        out = tmp_path / f"loop{round_}.jsonl"
        proc = run(
            otk_worker.issue_loop, softhsm_token.uri, {"pin": softhsm_token.pin}, name, str(out)
        )
        wait_for(out, "ready")
        time.sleep(rng.uniform(0.1, 0.8))
        proc.kill()
        proc.join(30)
        reported += [r for r in read(out) if "issued" in r]
    assert reported, "the worker never issued a key before it was killed"
    with token_hsm.one_time_keys(otk_worker.SPEC, pool=1, alg=otk_worker.ALG, name=name) as otk:
        for r in reported:
            assert otk.decrypt_jwe(encrypt(r["jwk"], b"after the crash")) == b"after the crash"
            with pytest.raises(KeyExpired):
                otk.decrypt_jwe(encrypt(r["jwk"], b"again"))
    # a day later a sweep anywhere removes what the killed processes left: their never-issued
    # pool keys (pooled over 24 h ago) and the expired keys' records
    later = datetime.now(UTC) + timedelta(hours=25)
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, clock=lambda: later) as hsm:
        sweeper = hsm.one_time_keys(otk_worker.SPEC, pool=1, alg=otk_worker.ALG, name=name)
        sweeper.close()
        assert sweeper.sweep()
        assert not [i for i in token_hsm.list_keys() if i.label.startswith(f"otk.{name}.")]
        assert sweeper.sweep() == []
        assert sweeper._store.contents(name) == ([], [])  # no record left either


def test_sigkill_while_decrypting_never_decrypts_twice(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM, tmp_path: Path
) -> None:
    """Kill a decrypting process at random points, then decrypt everything here: what it
    decrypted (or was decrypting) is refused, the rest decrypts; nothing twice."""
    name = pool_name()
    rng = random.Random()
    with token_hsm.one_time_keys(otk_worker.SPEC, pool=8, alg=otk_worker.ALG, name=name) as otk:
        for round_ in range(3):
            keys = [otk.issue() for _ in range(8)]
            tokens = [encrypt(k.jwk, k.kid.encode()) for k in keys]
            out = tmp_path / f"kill{round_}.jsonl"
            proc = run(
                otk_worker.decrypt,
                softhsm_token.uri,
                {"pin": softhsm_token.pin},
                name,
                tokens,
                0.0,
                str(out),
            )
            wait_for(out, "ready")
            time.sleep(rng.uniform(0.0, 0.5))  # a decrypt takes ~60 ms: kill inside one
            proc.kill()
            proc.join(30)
            lines = read(out)
            claimed = {r["claiming"] for r in lines if "claiming" in r}
            done = {r["kid"] for r in lines if "plaintext" in r}
            for k, token in zip(keys, tokens, strict=True):
                if k.kid in done:
                    with pytest.raises(KeyExpired, match="already used"):
                        otk.decrypt_jwe(token)
                elif k.kid in claimed:  # killed inside this decrypt: at most one of the two
                    with contextlib.suppress(KeyExpired):
                        assert otk.decrypt_jwe(token) == k.kid.encode()
                else:
                    assert otk.decrypt_jwe(token) == k.kid.encode()
