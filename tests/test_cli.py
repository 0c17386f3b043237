"""The ``hsmbridge`` command, run as a real subprocess on the session's token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsmbridge.testing import SoftToken


def run(
    token: SoftToken, *args: str, stdin: bytes = b"", env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        **token.env(),
        "HSMBRIDGE_HSM": token.uri,
        "HSMBRIDGE_PIN": token.pin,
        **(env_extra or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "hsmbridge.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )


def test_keygen_list_pubkey_sign_decrypt_delete(
    softhsm_token: SoftToken, unique_label: str, tmp_path: Path
) -> None:
    r = run(softhsm_token, "keygen", "--type", "rsa:2048", "--label", unique_label,
            "--usage", "sign,decrypt")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert unique_label.encode() in r.stdout

    r = run(softhsm_token, "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["label"]: row for row in json.loads(r.stdout)}
    assert rows[unique_label]["type"] == "rsa"
    assert rows[unique_label]["size"] == 2048
    assert rows[unique_label]["usage"] == ["decrypt", "sign"]

    pem = tmp_path / "pub.pem"
    r = run(softhsm_token, "pubkey", unique_label, "--format", "pem", "--out", str(pem))
    assert r.returncode == 0, r.stderr
    subprocess.run(["openssl", "pkey", "-pubin", "-in", str(pem), "-noout"], check=True)

    # Binary-safe sign through stdin/stdout, verified by OpenSSL's CLI.
    message = bytes(range(256)) * 4 + b"\x00\r\n\x1a"
    (tmp_path / "msg").write_bytes(message)
    r = run(softhsm_token, "sign", unique_label, "--mechanism", "rsa-pkcs1-sha256", stdin=message)
    assert r.returncode == 0, r.stderr
    (tmp_path / "sig").write_bytes(r.stdout)
    subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature", str(tmp_path / "sig"),
         str(tmp_path / "msg")],
        check=True, capture_output=True,
    )  # fmt: skip

    # Decrypt a ciphertext made by OpenSSL, file in, file out.
    secret = b"\x00binary\xffsecret\n"
    (tmp_path / "pt").write_bytes(secret)
    subprocess.run(
        ["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", str(pem),
         "-in", str(tmp_path / "pt"), "-out", str(tmp_path / "ct"),
         "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1"],
        check=True,
    )  # fmt: skip
    r = run(softhsm_token, "decrypt", unique_label, "-m", "rsa-oaep-sha1",
            "--in", str(tmp_path / "ct"), "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == secret

    r = run(softhsm_token, "delete", unique_label)
    assert r.returncode == 0, r.stderr
    r = run(softhsm_token, "pubkey", unique_label)
    assert r.returncode == 1
    assert b"KeyNotFound" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["der", "jwk", "upload-json"])
def test_pubkey_formats(softhsm_token: SoftToken, unique_label: str, fmt: str) -> None:
    assert (
        run(softhsm_token, "keygen", "--type", "ec:p256", "--label", unique_label).returncode == 0
    )
    r = run(softhsm_token, "pubkey", unique_label, "--format", fmt)
    assert r.returncode == 0, r.stderr
    if fmt == "der":
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        load_der_public_key(r.stdout)
    elif fmt == "jwk":
        jwk = json.loads(r.stdout)
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["kid"]
    else:
        body = json.loads(r.stdout)
        assert body["public_key"].startswith("-----BEGIN PUBLIC KEY-----\n")
    run(softhsm_token, "delete", unique_label)


def test_exit_codes_and_errors(softhsm_token: SoftToken) -> None:
    assert run(softhsm_token, "frobnicate").returncode == 2
    assert run(softhsm_token, "keygen", "--label", "x").returncode == 2  # --type missing
    r = run(softhsm_token, "keygen", "--type", "rsa:12", "--label", "x")
    assert r.returncode == 1 and b"InvalidInput" in r.stderr
    r = run(softhsm_token, "list", env_extra={"HSMBRIDGE_HSM": ""})
    assert r.returncode == 2 and b"--hsm" in r.stderr
    wrong = "pkcs11:token=no-such-token?module-path=" + softhsm_token.module
    r = run(softhsm_token, "--hsm", wrong, "list")
    assert r.returncode == 1 and b"TokenNotFound" in r.stderr
    assert softhsm_token.pin.encode() not in r.stderr
    r = run(softhsm_token, "sign", "nope", "-m", "rsa-pkcs1-sha256", stdin=b"x")
    assert r.returncode == 1 and b"KeyNotFound" in r.stderr


def test_demo_on_the_embedded_token(tmp_path: Path, softhsm_token: SoftToken) -> None:
    env = {"HSMBRIDGE_DEMO_DIR": str(tmp_path / "demo"), "HSMBRIDGE_HSM": ""}
    r = run(softhsm_token, "demo", "--count", "50", env_extra=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "-----BEGIN PUBLIC KEY-----" in out
    assert "ops/s" in out and "every signature verified" in out
    # Idempotent: the second run reuses the embedded token.
    r = run(softhsm_token, "demo", "--count", "20", env_extra=env)
    assert r.returncode == 0, r.stderr
