"""The README's "Use" snippet runs as printed: a CSR and a PyJWT token from an HSM key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jwt
import pytest

from hsmbridge import EC, HSM

README = Path(__file__).resolve().parent.parent / "README.md"
INTRO = "A CSR and a JWT made with a key in the HSM"


def _snippet() -> str:
    text = README.read_text()
    assert INTRO in text, "the README lost its CSR/JWT snippet"
    block = re.search(r"```python\n(.*?)```", text[text.index(INTRO) :], re.DOTALL)
    assert block is not None
    return block.group(1)


def test_snippet_is_under_ten_lines() -> None:
    assert len(_snippet().strip().splitlines()) < 10


def test_snippet_makes_a_csr_and_a_token(
    pkcs11_hsm: HSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"hsm": pkcs11_hsm, "EC": EC}
    try:
        exec(compile(_snippet(), str(README), "exec"), scope)
        key = pkcs11_hsm.get_key("api-2026")
        done = subprocess.run(
            ["openssl", "req", "-in", "api.csr", "-verify", "-noout", "-subject"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "CN = api.example.com" in done.stdout
        token = scope["token"]
        assert isinstance(token, str)
        assert jwt.get_unverified_header(token)["kid"] == key.jwk_thumbprint()
        claims = jwt.decode(token, key.public_key(), algorithms=["ES256"])  # type: ignore[arg-type]
        assert claims == {"sub": "billing"}
    finally:
        for info in pkcs11_hsm.list_keys():
            if info.label == "api-2026":
                pkcs11_hsm.get_key(key_id=info.id).delete()


ONE_TIME = "## One-time keys: the card tokenization flow"


def test_one_time_key_flow_runs_as_printed(pkcs11_hsm: HSM) -> None:
    """The README's whole flow: issue, the browser (jwcrypto) verifies the context and
    encrypts, the service decrypts once."""
    from hsmbridge import KeyExpired

    text = README.read_text()
    assert ONE_TIME in text, "the README lost its one-time key flow"
    block = re.search(r"```python\n(.*?)```", text[text.index(ONE_TIME) :], re.DOTALL)
    assert block is not None
    scope: dict[str, object] = {"hsm": pkcs11_hsm}
    exec(compile(block.group(1), str(README), "exec"), scope)
    assert scope["plaintext"] == b'{"number":"4111111111111111"}'
    otk, card = scope["otk"], scope["card"]
    with pytest.raises(KeyExpired, match="already used"):
        otk.decrypt_jwe(card.serialize(compact=True))  # type: ignore[attr-defined]
