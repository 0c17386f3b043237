"""``hsmbridge ring create / rotate / versions / jwks / sweep`` and ring names in
``sign``/``decrypt``/``pubkey``, as real subprocesses on the session's token."""

from __future__ import annotations

import json
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_cli import run

from hsmbridge.cli import parse_duration
from hsmbridge.testing import SoftToken


def test_duration_parsing() -> None:
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("0").total_seconds() == 0
    for bad in ("24", "h", "1y", "-5m"):
        try:
            parse_duration(bad)
        except Exception as exc:  # argparse turns it into a usage error
            assert "not a duration" in str(exc)
        else:
            raise AssertionError(bad)


def test_ring_commands(softhsm_token: SoftToken) -> None:
    name = f"c{uuid.uuid4().hex[:10]}"
    r = run(softhsm_token, "ring", "create", name, "--type", "rsa:2048", "--usage", "sign,decrypt")
    assert r.returncode == 0, r.stderr
    assert f"{name}@1".encode() in r.stdout and b"primary" in r.stdout
    r = run(softhsm_token, "ring", "create", name, "--type", "rsa:2048")
    assert r.returncode == 1 and b"KeyExists" in r.stderr

    r = run(softhsm_token, "rotate", name, "--grace", "24h")
    assert r.returncode == 0, r.stderr
    assert f"{name}@2".encode() in r.stdout

    r = run(softhsm_token, "versions", name, "--json")
    assert r.returncode == 0, r.stderr
    versions = json.loads(r.stdout)
    assert [(v["version"], v["state"]) for v in versions] == [(1, "grace"), (2, "primary")]
    assert versions[0]["not_after"] is not None

    r = run(softhsm_token, "jwks", name)
    assert r.returncode == 0, r.stderr
    assert [k["kid"] for k in json.loads(r.stdout)["keys"]] == [v["kid"] for v in versions][::-1]

    publics = {}
    for label in (f"{name}@1", name):  # NAME is the primary, version 2
        r = run(softhsm_token, "pubkey", label)
        assert r.returncode == 0, r.stderr
        publics[label] = serialization.load_pem_public_key(r.stdout)
    for label, public in publics.items():
        assert isinstance(public, rsa.RSAPublicKey)
        r = run(softhsm_token, "sign", label, "-m", "rsa-pss-sha256", stdin=b"cli")
        assert r.returncode == 0, r.stderr
        public.verify(
            r.stdout, b"cli", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
        )
        ct = public.encrypt(
            b"secret", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        )
        r = run(softhsm_token, "decrypt", name, "-m", "rsa-oaep-sha1", stdin=ct)  # by trial
        assert (r.returncode, r.stdout) == (0, b"secret"), r.stderr

    r = run(softhsm_token, "sweep", "--dry-run")
    assert r.returncode == 0 and f"{name}@".encode() not in r.stdout
    r = run(softhsm_token, "rotate", name)  # no grace: version 2 expires at once
    assert r.returncode == 0, r.stderr
    r = run(softhsm_token, "sweep")
    assert r.returncode == 0, r.stderr
    swept = [line for line in r.stdout.decode().splitlines() if f"{name}@" in line]
    assert len(swept) == 2 and swept[0].startswith(f"destroyed {name}@1 ")
    assert swept[1].startswith(f"destroyed {name}@2 ")
    r = run(softhsm_token, "versions", name)  # a rotation without grace ends every old version
    assert [line.split()[0::5][:2] for line in r.stdout.decode().splitlines()] == [
        [f"{name}@3", "primary"]
    ]
    r = run(softhsm_token, "sign", f"{name}@2", "-m", "rsa-pss-sha256", stdin=b"late")
    assert r.returncode == 1 and b"KeyExpired" in r.stderr and b"destroyed by a sweep" in r.stderr
    r = run(softhsm_token, "rotate", name, "--grace", "soon")
    assert r.returncode == 2 and b"not a duration" in r.stderr
