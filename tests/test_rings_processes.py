"""Key rings across real processes: SIGKILL mid-rotation and mid-sweep, two
processes rotating at once, one process seeing another's rotation in real
time, and other tools seeing the key dates (PKCS#11 on SoftHSM2; the
concurrent rotation on NetHSM too)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import hsmbridge
from hsmbridge import EC, RSA
from hsmbridge.testing import SoftToken

WORKER = str(Path(__file__).with_name("ring_worker.py"))


def ring_name() -> str:
    return f"p{uuid.uuid4().hex[:10]}"


def pkcs11_env(token: SoftToken) -> dict[str, str]:
    return {**os.environ, **token.env(), "HSMBRIDGE_PIN": token.pin}


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def token_hsm(softhsm_token: SoftToken) -> Iterator[hsmbridge.HSM]:
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    yield hsm
    hsm.close()


def check_ring(hsm: hsmbridge.HSM, name: str) -> list[hsmbridge.KeyVersion]:
    """The invariants: consecutive versions, each with a key that signs, one primary."""
    versions = hsm.key_ring(name).versions()  # a fresh ring object: no cached state
    numbers = [v.version for v in versions] or [0]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), versions
    assert [v.state for v in versions].count("primary") == (1 if versions else 0)
    assert all(v.label == f"{name}@{v.version}" for v in versions)  # each record's own key
    if versions:
        assert versions[-1].state == "primary"
        ring = hsm.key_ring(name)
        sig = ring.sign(b"alive", "ecdsa-sha256")
        public = ring.primary.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(sig, b"alive", ec.ECDSA(hashes.SHA256()))
    return versions


@pytest.mark.parametrize("command", ["rotate-loop", "sweep-loop"])
def test_sigkill_leaves_old_or_new_state(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM, command: str
) -> None:
    """Kill a rotating (or rotating and sweeping) process at random points, 8 times."""
    name = ring_name()
    env = pkcs11_env(softhsm_token)
    rng = random.Random()
    reported = 0
    for _ in range(8):
        proc = start([command, softhsm_token.uri, name], env)
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        time.sleep(rng.uniform(0.1, 1.2))  # a rotation takes ~0.3 s here: kill somewhere in one
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        done = [line["rotated"] for line in lines(out) if "rotated" in line]
        reported = max([reported, *done])
        versions = check_ring(token_hsm, name)
        newest = versions[-1].version if versions else 0
        assert newest in (reported, reported + 1)  # the last rotation: not begun, or complete
        reported = newest
        if command == "sweep-loop":
            assert [v.state for v in versions].count("expired") <= 2
    assert reported >= 3  # rotations did complete between the kills
    # what a killed process left behind does not stop the next rotation
    token_hsm.key_ring(name).rotate(EC("P-256"), usage="sign")
    assert check_ring(token_hsm, name)[-1].version == reported + 1


def _race(env: dict[str, str], uri: str, name: str) -> list[dict[str, Any]]:
    begin = time.time() + 1.5  # both processes are up and waiting by then
    procs = [start(["rotate-at", uri, name, str(begin)], env) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results += lines(out)
    return results


def _races(env: dict[str, str], uri: str, name: str, versions: Any) -> None:
    """Race two rotations until they overlap (a loaded machine may run them one
    after the other). Overlapping: exactly one wins, the other is told why;
    one after the other: two consecutive versions. Never two of one number."""
    newest = 0
    for _ in range(6):
        results = _race(env, uri, name)
        won = sorted(r["won"] for r in results if "won" in r)
        lost = [r["lost"] for r in results if "lost" in r]
        numbers = [v.version for v in versions()]
        assert numbers == list(range(1, numbers[-1] + 1))
        if lost:
            assert won == [newest + 1], results
            assert "concurrent rotation" in lost[0] or "collided" in lost[0]
            assert numbers[-1] == newest + 1
            return
        assert won == [newest + 1, newest + 2], results
        newest += 2
    raise AssertionError("six races in a row never overlapped; the machine is too busy")


def test_two_processes_rotating_at_once_pkcs11(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM
) -> None:
    name = ring_name()
    _races(pkcs11_env(softhsm_token), softhsm_token.uri, name, lambda: check_ring(token_hsm, name))


def test_two_processes_rotating_at_once_nethsm(nethsm_hsm: hsmbridge.HSM) -> None:
    from nethsm_fixtures import bridge_of

    bridge = bridge_of(nethsm_hsm)  # type: ignore[arg-type]
    uri = f"nethsm://{bridge.admin.user}@{bridge.hostport}?fingerprint={bridge.fingerprint}"
    env = {**os.environ, "NETHSM_PASSWORD": bridge.admin.passphrase}
    name = ring_name()
    ring = nethsm_hsm.key_ring(name)
    _races(env, uri, name, ring.versions)
    assert [v.state for v in ring.versions()][-1] == "primary"


def test_another_process_sees_the_rotation_in_real_time(
    softhsm_token: SoftToken, token_hsm: hsmbridge.HSM
) -> None:
    """Process B signs with the primary in a loop; A rotates with 3 s of grace."""
    name = ring_name()
    ring = token_hsm.key_ring(name)
    v1 = ring.rotate(EC("P-256"), usage="sign")
    watcher = start(["watch", softhsm_token.uri, name, "6"], pkcs11_env(softhsm_token))
    assert watcher.stdout is not None
    assert json.loads(watcher.stdout.readline()) == {"ready": True}
    time.sleep(0.5)
    v2 = ring.rotate(grace=timedelta(seconds=3))
    old = ring.version(1)
    old.sign(b"in grace", "ecdsa-sha256")  # v1 still works during the grace period
    time.sleep(3.2)
    with pytest.raises(hsmbridge.KeyExpired, match=f"version 1 of ring '{name}' expired"):
        old.sign(b"too late", "ecdsa-sha256")
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    seen = lines(out)
    assert [s["primary"] for s in seen if "primary" in s] == [1, 2]
    assert not [s for s in seen if "error" in s]
    for entry, version in zip((s for s in seen if "primary" in s), (v1, v2), strict=True):
        assert entry["kid"] == version.kid
    assert ring.sweep()[0].version == 1


@pytest.mark.skipif(shutil.which("pkcs11-dump") is None, reason="apt-get install pkcs11-dump")
def test_other_tools_see_the_dates(softhsm_token: SoftToken, token_hsm: hsmbridge.HSM) -> None:
    """CKA_START_DATE of ring versions and CKA_END_DATE of expiring keys as another
    PKCS#11 tool reads them (pkcs11-dump; OpenSC 0.23's pkcs11-tool --list-objects
    prints no dates)."""
    name = ring_name()
    ring = token_hsm.key_ring(name)
    ring.rotate(EC("P-256"), usage="sign")
    ring.rotate(grace=timedelta(days=2))
    token_hsm.generate_key(EC("P-256"), label=name + "-t", expires_in=timedelta(days=3))
    today = token_hsm.clock().date()
    slot = str(token_hsm.token.slot.slot_id)  # type: ignore[attr-defined]
    dump = subprocess.run(
        ["pkcs11-dump", "dump", softhsm_token.module, slot, "-"],
        input=softhsm_token.pin + "\n",  # the PIN on stdin, never in argv
        capture_output=True,
        text=True,
        env={**os.environ, **softhsm_token.env()},
        timeout=60,
        check=True,
    ).stdout
    dates: dict[str, list[tuple[str, str]]] = {}
    label = ""
    start_date = ""
    for line in dump.splitlines():
        field, _, value = (part.strip() for part in line.partition(":"))
        if field == "CKA_LABEL":
            label = value
        elif field == "CKA_START_DATE":
            start_date = value
        elif field == "CKA_END_DATE":
            dates.setdefault(label, []).append((start_date, value))
    day = f"{today:%Y%m%d}"
    assert (day, "") in dates[f"{name}@1"] and (day, "") in dates[f"{name}@2"]
    assert any(end == f"{today + timedelta(days=3):%Y%m%d}" for _, end in dates[name + "-t"])


def test_rsa_ring_keys_are_sensitive(token_hsm: hsmbridge.HSM) -> None:
    """Ring versions are made by generate_key: non-extractable like every key."""
    from pkcs11 import Attribute, ObjectClass

    name = ring_name()
    version = token_hsm.key_ring(name).rotate(RSA(2048), usage="decrypt")
    with token_hsm.pool.admin() as session:  # type: ignore[attr-defined]
        [priv] = session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: bytes.fromhex(version.key_id)}
        )
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
