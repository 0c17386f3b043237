"""The ``hsmbridge`` command, run as a real subprocess on the session's token."""

from __future__ import annotations

import json
import os
import pty
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hsmbridge.cli import FORMATS
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
    extra = ["--key-type", "ec"] if fmt == "upload-json" else []
    r = run(softhsm_token, "pubkey", unique_label, "--format", fmt, *extra)
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
    assert "one-time keys (alg RSA-OAEP: no OAEP-SHA256 here)" in out  # SoftHSM2: said so
    assert "issue() from the warm pool" in out and "second decrypt refused" in out
    # Idempotent: the second run reuses the embedded token.
    r = run(softhsm_token, "demo", "--count", "20", env_extra=env)
    assert r.returncode == 0, r.stderr


def test_upload_json_wants_rsa_by_default(softhsm_token: SoftToken, unique_label: str) -> None:
    assert (
        run(softhsm_token, "keygen", "--type", "ec:p256", "--label", unique_label).returncode == 0
    )
    try:
        r = run(softhsm_token, "pubkey", unique_label, "--format", "upload-json")
        assert r.returncode == 1 and not r.stdout
        line = r.stderr.decode().strip()
        assert "InvalidInput" in line and "RSA" in line and "EC P-256" in line
        assert len(line.splitlines()) == 1
        r = run(
            softhsm_token, "pubkey", unique_label, "--format", "upload-json", "--key-type", "any"
        )
        assert r.returncode == 0 and json.loads(r.stdout)["public_key"].startswith("-----BEGIN")
    finally:
        run(softhsm_token, "delete", unique_label)


def test_global_options_before_or_after_the_subcommand(
    softhsm_token: SoftToken, unique_label: str
) -> None:
    uri = {"HSMBRIDGE_HSM": ""}  # only the command line names the HSM
    r = run(softhsm_token, "--hsm", softhsm_token.uri, "keygen", "--type", "ec:p256",
            "--label", unique_label, "--json", env_extra=uri)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] == unique_label
    for args in (
        ["--hsm", softhsm_token.uri, "--json", "list"],
        ["list", "--hsm", softhsm_token.uri, "--json"],
        ["--json", "list", "--hsm", softhsm_token.uri],
    ):
        r = run(softhsm_token, *args, env_extra=uri)
        assert r.returncode == 0, (args, r.stderr)
        assert unique_label in {row["label"] for row in json.loads(r.stdout)}, args
    r = run(softhsm_token, "list", "--hsm", softhsm_token.uri, env_extra=uri)
    table = r.stdout.decode()
    assert r.returncode == 0 and table.startswith("label") and unique_label in table
    r = run(softhsm_token, "delete", unique_label, "--hsm", softhsm_token.uri, "--json",
            env_extra=uri)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"]["label"] == unique_label


def test_csr_and_certificate_commands(
    softhsm_token: SoftToken, unique_label: str, tmp_path: Path
) -> None:
    assert (
        run(softhsm_token, "keygen", "--type", "rsa:2048", "--label", unique_label).returncode == 0
    )
    try:
        r = run(softhsm_token, "csr", unique_label, "--subject", "CN=api.example,O=Example",
                "--san", "DNS:api.example", "--san", "IP:127.0.0.1")  # fmt: skip
        assert r.returncode == 0, r.stderr
        (tmp_path / "r.csr").write_bytes(r.stdout)
        done = subprocess.run(["openssl", "req", "-in", str(tmp_path / "r.csr"), "-verify",
                               "-noout", "-text"], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "api.example" in done.stdout and "IP Address:127.0.0.1" in done.stdout

        r = run(softhsm_token, "cert", "self-sign", unique_label, "--subject", "CN=api.example",
                "--days", "30", "--out", str(tmp_path / "c.pem"))  # fmt: skip
        assert r.returncode == 0, r.stderr
        cert = str(tmp_path / "c.pem")
        done = subprocess.run(["openssl", "verify", "-CAfile", cert, cert],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        r = run(softhsm_token, "cert", "show", unique_label, "--json")
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        assert shown["subject"] == "CN=api.example"
        assert shown["pem"] == (tmp_path / "c.pem").read_text()
        r = run(softhsm_token, "cert", "show", unique_label)
        assert r.returncode == 0 and "CN=api.example" in r.stdout.decode()
        assert r.stdout.decode().startswith("field")

        r = run(softhsm_token, "cert", "delete", unique_label)
        assert r.returncode == 0, r.stderr
        r = run(softhsm_token, "cert", "show", unique_label)
        assert r.returncode == 1 and b"no certificate" in r.stderr
        r = run(softhsm_token, "cert", "import", unique_label, "--in", str(tmp_path / "c.pem"))
        assert r.returncode == 0, r.stderr
        r = run(softhsm_token, "cert", "show", unique_label, "--pem")
        assert r.stdout.decode() == (tmp_path / "c.pem").read_text()
        r = run(softhsm_token, "cert", "import", unique_label, stdin=b"junk")
        assert r.returncode == 1 and b"InvalidInput" in r.stderr
    finally:
        run(softhsm_token, "delete", unique_label)


def _one_error_line(r: subprocess.CompletedProcess[bytes], code: int, says: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert "Traceback" not in err
    assert says in err, err
    assert err.strip().splitlines()[-1].startswith("hsmbridge: "), err


def test_serve_errors_are_one_line(softhsm_token: SoftToken, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    for listen in ("127.0.0.1:99999", "no.such.host.invalid:8443", "nocolon"):
        r = run(softhsm_token, "serve", "--listen", listen, "--state-dir", state)
        _one_error_line(r, 1, "listen")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(softhsm_token, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", state)
        _one_error_line(r, 1, "the port is in use")
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run(softhsm_token, "serve", "--listen", "127.0.0.1:1", "--state-dir", str(blocker / "x"))
    _one_error_line(r, 1, "state directory")
    bad = tmp_path / "bad.pem"
    bad.write_text("not PEM")
    r = run(softhsm_token, "serve", "--state-dir", state, "--tls-cert", str(bad),
            "--tls-key", str(bad))  # fmt: skip
    _one_error_line(r, 1, "not a PEM certificate")
    r = run(softhsm_token, "serve", "--state-dir", state, "--tls-cert", str(tmp_path / "none"),
            "--tls-key", str(bad))  # fmt: skip
    _one_error_line(r, 1, "cannot read --tls-cert")


@pytest.mark.parametrize("command", [["demo", "--count"], ["bench", "--rounds"]])
def test_negative_counts_are_usage_errors(softhsm_token: SoftToken, command: list[str]) -> None:
    for bad in ("-5", "0", "many"):
        r = run(softhsm_token, *command, bad)
        _one_error_line(r, 2, command[1])


def test_bash_completion(softhsm_token: SoftToken) -> None:
    script = run(softhsm_token, "completion", "bash")
    assert script.returncode == 0, script.stderr

    def complete(*words: str) -> list[str]:
        """What Tab offers for the last of ``words`` (typed after ``hsmbridge``)."""
        quoted = " ".join(shlex.quote(w) for w in ("hsmbridge", *words))
        program = (
            f"source /dev/stdin; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
            '_hsmbridge; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", program], input=script.stdout, capture_output=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().split()

    assert set(complete("ce")) == {"cert"}
    assert {"self-sign", "import", "show", "delete"} <= set(complete("cert", ""))
    assert set(complete("cert", "sh")) == {"show"}
    assert "--days" in complete("cert", "self-sign", "web", "--d")
    assert set(complete("pubkey", "k", "--format", "")) == set(FORMATS)
    assert "--json" in complete("list", "--j") and "--hsm" in complete("serve", "--h")
    assert set(complete("completion", "")) >= {"bash", "zsh"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads(softhsm_token: SoftToken) -> None:
    script = run(softhsm_token, "completion", "zsh")
    assert script.returncode == 0 and script.stdout.startswith(b"#compdef hsmbridge")
    # bashcompinit's compgen runs the function as zsh's completion would; zsh filters
    # the words by prefix itself, so the reply is every word for the command path
    program = (
        "autoload -U +X compinit && compinit -u; source /dev/stdin; "
        "COMP_WORDS=(hsmbridge cert sh); COMP_CWORD=2; compgen -F _hsmbridge -- sh"
    )
    done = subprocess.run(["zsh", "-f", "-c", program], input=script.stdout, capture_output=True)
    assert done.returncode == 0, done.stderr
    words = done.stdout.decode().split()
    assert {"self-sign", "import", "show", "delete"} <= set(words) and "keygen" not in words


def test_progress_bar_only_on_a_terminal(softhsm_token: SoftToken, tmp_path: Path) -> None:
    """The demo's bar goes to stderr when it is a TTY, and is absent otherwise."""
    env = {
        **os.environ,
        **softhsm_token.env(),
        "HSMBRIDGE_HSM": softhsm_token.uri,
        "HSMBRIDGE_PIN": softhsm_token.pin,
    }
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "hsmbridge.cli", "demo", "--count", "20"],
            stdout=subprocess.PIPE, stderr=follower, env=env,
        )  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = process.communicate(timeout=120)
    finally:
        os.close(leader)
    assert process.returncode == 0, seen
    assert b"\r[" in seen and b"/3 RSA-2048 sign" in seen
    assert b"[" not in out.split(b"\n")[0] and b"\r" not in out  # stdout is untouched
    piped = run(softhsm_token, "demo", "--count", "20")
    assert piped.returncode == 0 and b"\r" not in piped.stderr + piped.stdout


def test_info_prints_what_was_learned_about_the_token(softhsm_token: SoftToken) -> None:
    r = run(softhsm_token, "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["token"] == softhsm_token.label
    assert info["module family"] == "SoftHSM2"
    assert info["OS locking"] == "accepted"
    assert info["native engine"] == "on"
    assert "rsa-oaep-sha1" in info["mechanisms"]
    assert "rsa-oaep-sha256" not in info["mechanisms"]  # probed: SoftHSM2 lacks it
    r = run(softhsm_token, "info")
    assert r.returncode == 0 and b"max sessions" in r.stdout


def test_a_uri_works_wherever_a_label_does(
    softhsm_token: SoftToken, unique_label: str, tmp_path: Path
) -> None:
    r = run(softhsm_token, "keygen", "--type", "ec:p256", "--label", unique_label)
    assert r.returncode == 0, r.stderr
    uri = f"pkcs11:object={unique_label};type=private"
    r = run(softhsm_token, "sign", uri, "--mechanism", "ecdsa-sha256", stdin=b"by uri")
    assert r.returncode == 0, r.stderr
    (tmp_path / "sig").write_bytes(r.stdout)
    (tmp_path / "msg").write_bytes(b"by uri")
    r = run(softhsm_token, "pubkey", uri, "--out", str(tmp_path / "pub.pem"))
    assert r.returncode == 0, r.stderr
    subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"),
         "-signature", str(tmp_path / "sig"), str(tmp_path / "msg")],
        check=True, capture_output=True,
    )  # fmt: skip
    r = run(softhsm_token, "delete", uri)
    assert r.returncode == 0, r.stderr
    r = run(softhsm_token, "sign", uri, "--mechanism", "ecdsa-sha256", stdin=b"gone")
    assert r.returncode == 1 and b"KeyNotFound" in r.stderr
