"""What only the PKCS#11 backend promises, checked against OpenSC's pkcs11-tool.

Keys hsmbridge generates must be sensitive and never extractable as another
PKCS#11 application sees them; keys other applications made must be usable;
RFC 7512 URIs must select the right token and PIN.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from oracles import crypto_encrypt, crypto_verify

import hsmbridge
from hsmbridge import (
    EC,
    HSM,
    RSA,
    AmbiguousKey,
    AuthenticationError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    Mechanism,
)
from hsmbridge.testing import SoftToken
from hsmbridge.uri import parse_pkcs11_uri


def tool_bytes(token: SoftToken, *args: str) -> bytes:
    """Run pkcs11-tool, logged in, on the session's token (same SOFTHSM2_CONF)."""
    done = subprocess.run(
        ["pkcs11-tool", "--module", token.module, "--token-label", token.label,
         "--login", "--pin", token.pin, *args],
        capture_output=True, timeout=120, env={**os.environ, **token.env()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def tool(token: SoftToken, *args: str) -> str:
    return tool_bytes(token, *args).decode()


def objects(listing: str) -> list[dict[str, str]]:
    """``--list-objects`` output as one dict per object (``kind`` is the header line)."""
    found: list[dict[str, str]] = []
    for line in listing.splitlines():
        if line and not line[0].isspace():
            found.append({"kind": line.strip()})
        elif found and ":" in line:
            name, _, value = line.strip().partition(":")
            found[-1][name.strip().lower()] = value.strip()
    return found


def private_object(token: SoftToken, label: str) -> dict[str, str]:
    listing = tool(token, "--list-objects", "--type", "privkey")
    matches = [o for o in objects(listing) if o.get("label") == label]
    assert len(matches) == 1, listing
    return matches[0]


def keypairgen(token: SoftToken, key_type: str, label: str, key_id: str, *extra: str) -> None:
    tool(token, "--keypairgen", "--key-type", key_type, "--label", label, "--id", key_id, *extra)


def verify_sign(key: hsmbridge.Key, mech: Mechanism) -> None:
    public = serialization.load_pem_public_key(key.public_key_pem().encode())
    message = b"pkcs11 " + os.urandom(8)
    assert crypto_verify(public, key.sign(message, mech), message, mech)


@pytest.fixture
def made_keys(pkcs11_hsm: HSM) -> Iterator[list[str]]:
    """Labels to clean up at the end of a test, whoever made the keys."""
    labels: list[str] = []
    yield labels
    for label in labels:
        while True:
            matches = [i for i in pkcs11_hsm.list_keys() if i.label == label]
            if not matches:
                break
            pkcs11_hsm.get_key(label, key_id=matches[0].id).delete()


@pytest.mark.parametrize("spec", [RSA(2048), EC("P-384")], ids=str)
def test_generated_private_key_is_sensitive_and_never_extractable(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, spec: hsmbridge.KeySpec
) -> None:
    key = pkcs11_hsm.generate_key(spec, unique_label)
    try:
        obj = private_object(softhsm_token, unique_label)
        access = {flag.strip() for flag in obj["access"].split(",")}
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= access
        assert "extractable" not in access
        assert obj["id"] == key.id
        assert obj["usage"] == "sign"  # exactly the usage asked for, nothing by default
        assert obj["kind"].startswith(
            "Private Key Object; " + ("RSA" if spec.key_type == "rsa" else "EC")
        )
    finally:
        key.delete()


@pytest.mark.parametrize(
    ("key_type", "spec", "mech"),
    [
        ("rsa:2048", RSA(2048), Mechanism.RSA_PSS_SHA256),
        ("EC:secp256r1", EC("P-256"), Mechanism.ECDSA_SHA256),
    ],
    ids=["rsa", "ec"],
)
def test_keys_made_by_pkcs11_tool_are_usable(
    pkcs11_hsm: HSM,
    softhsm_token: SoftToken,
    unique_label: str,
    made_keys: list[str],
    key_type: str,
    spec: hsmbridge.KeySpec,
    mech: Mechanism,
) -> None:
    key_id = uuid.uuid4().hex[:12]
    made_keys.append(unique_label)
    keypairgen(softhsm_token, key_type, unique_label, key_id)
    [info] = [i for i in pkcs11_hsm.list_keys() if i.label == unique_label]
    assert (info.id, info.spec) == (key_id, spec)
    # SoftHSM2 sets CKA_DECRYPT on these by default; an EC key still cannot decrypt
    assert info.usage == ({"sign", "decrypt"} if spec.key_type == "rsa" else {"sign"})
    by_label, by_id = pkcs11_hsm.get_key(unique_label), pkcs11_hsm.get_key(key_id=key_id)
    assert by_label.public_key_der() == by_id.public_key_der()
    verify_sign(by_label, mech)
    verify_sign(by_id, mech)
    pubkey = tool_bytes(softhsm_token, "--read-object", "--type", "pubkey", "--id", key_id)
    assert pubkey == by_id.public_key_der()


def test_duplicate_labels_are_ambiguous(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, made_keys: list[str]
) -> None:
    made_keys.append(unique_label)
    ours = pkcs11_hsm.generate_key(EC("P-256"), unique_label)
    theirs = uuid.uuid4().hex[:10]
    keypairgen(softhsm_token, "EC:secp256r1", unique_label, theirs)
    with pytest.raises(AmbiguousKey) as info:
        pkcs11_hsm.get_key(unique_label)
    assert ours.id in info.value.message and theirs in info.value.message
    assert {i.id for i in pkcs11_hsm.list_keys() if i.label == unique_label} == {ours.id, theirs}
    for key_id in (ours.id, theirs):
        verify_sign(pkcs11_hsm.get_key(unique_label, key_id=key_id), Mechanism.ECDSA_SHA256)
    with pytest.raises(KeyExists):
        pkcs11_hsm.generate_key(EC("P-256"), unique_label)


def test_usage_as_the_token_reports_it(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, made_keys: list[str]
) -> None:
    """pkcs11-tool 0.23 only sets flags to true; SoftHSM2 defaults the rest to true.

    So a ``--usage-sign`` key can in fact decrypt, and hsmbridge must say so.
    """
    made_keys.append(unique_label)
    key_id = uuid.uuid4().hex[:8]
    keypairgen(softhsm_token, "rsa:1024", unique_label, key_id, "--usage-sign")
    reported = {u.strip() for u in private_object(softhsm_token, unique_label)["usage"].split(",")}
    key = pkcs11_hsm.get_key(unique_label)
    assert key.info.usage == reported & {"sign", "decrypt"}
    verify_sign(key, Mechanism.RSA_PKCS1_SHA256)
    if "decrypt" in reported:
        public = serialization.load_pem_public_key(key.public_key_pem().encode())
        ct = crypto_encrypt(public, b"allowed", Mechanism.RSA_OAEP_SHA1)
        assert key.decrypt(ct, Mechanism.RSA_OAEP_SHA1) == b"allowed"


SIGN_ONLY_SCRIPT = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
module, token_label, pin, label, key_id = sys.argv[1:]
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open(rw=True, user_pin=pin) as session:
    session.generate_keypair(
        KeyType.RSA, 1024, store=True, mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        public_template={Attribute.LABEL: label, Attribute.ID: bytes.fromhex(key_id),
                         Attribute.ENCRYPT: False, Attribute.VERIFY: True},
        private_template={Attribute.LABEL: label, Attribute.ID: bytes.fromhex(key_id),
                          Attribute.DECRYPT: False, Attribute.SIGN: True,
                          Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
"""


def test_sign_only_key_refuses_decrypt(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, made_keys: list[str]
) -> None:
    """A key another application made with CKA_DECRYPT=false (pkcs11-tool cannot)."""
    made_keys.append(unique_label)
    key_id = uuid.uuid4().hex[:8]
    subprocess.run(
        [sys.executable, "-c", SIGN_ONLY_SCRIPT, softhsm_token.module, softhsm_token.label,
         softhsm_token.pin, unique_label, key_id],
        check=True, timeout=120, env={**os.environ, **softhsm_token.env()},
    )  # fmt: skip
    usage = private_object(softhsm_token, unique_label)["usage"].split(", ")
    assert "sign" in usage and "decrypt" not in usage
    key = pkcs11_hsm.get_key(unique_label)
    assert key.info.usage == {"sign"}
    verify_sign(key, Mechanism.RSA_PKCS1_SHA256)
    public = serialization.load_pem_public_key(key.public_key_pem().encode())
    ciphertext = crypto_encrypt(public, b"refused", Mechanism.RSA_PKCS1)
    with pytest.raises(InvalidInput, match=r"not made for decrypt.*usage"):
        key.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=True)
    with pytest.raises(InvalidInput, match="decrypt"):
        key.decrypt_batch([ciphertext, ciphertext], "rsa-pkcs1", allow_pkcs1v15=True)


# -- RFC 7512 URIs ----------------------------------------------------------------------


def test_uri_path_and_query_attributes() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;serial=0123abcd;slot-id=42;manufacturer=SoftHSM%20project;"
        "model=SoftHSM%20v2;object=k1;id=%01%02%ff%41"
        "?module-path=/opt/my%20lib/p11.so&pin-value=12%2634"
    )
    assert uri.token == "My Token"
    assert uri.serial == "0123abcd"
    assert uri.slot_id == 42
    assert uri.manufacturer == "SoftHSM project"
    assert uri.model == "SoftHSM v2"
    assert uri.object == "k1"
    assert uri.id == b"\x01\x02\xffA"
    assert uri.module_path == "/opt/my lib/p11.so"
    assert uri.pin is not None and uri.pin.value == "12&34"


def test_pin_sources_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin.txt"
    pin_file.write_text("from-file\n")
    monkeypatch.setenv("HSMBRIDGE_PIN", "from-default-env")
    monkeypatch.setenv("MY_PIN", "from-named-env")

    def pin_of(uri: str, pin: str | None = None) -> str | None:
        parsed = parse_pkcs11_uri(uri, pin=pin)
        return parsed.pin.value if parsed.pin else None

    assert pin_of(f"pkcs11:token=t?pin-source=file:{pin_file}") == "from-file"
    assert pin_of(f"pkcs11:token=t?pin-source={pin_file}") == "from-file"
    assert pin_of("pkcs11:token=t") == "from-default-env"
    assert pin_of("pkcs11:token=t?pin-env=MY_PIN") == "from-named-env"
    assert pin_of("pkcs11:token=t?pin-value=v") == "v"
    assert pin_of(f"pkcs11:token=t?pin-value=v&pin-source={pin_file}") == "v"
    assert pin_of("pkcs11:token=t?pin-value=v", pin="explicit") == "explicit"
    monkeypatch.delenv("HSMBRIDGE_PIN")
    assert pin_of("pkcs11:token=t") is None


def token_slots(token: SoftToken) -> dict[str, tuple[int, str]]:
    """label -> (slot id, serial) as softhsm2-util reports them."""
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, check=True,
        env={**os.environ, **token.env()},
    ).stdout  # fmt: skip
    found = {}
    for block in re.split(r"^Slot (?=\d)", out, flags=re.M)[1:]:
        slot = int(block.split()[0])
        label = re.search(r"Label:\s*(.*?)\s*$", block, re.M)
        serial = re.search(r"Serial number:\s*(\S+)", block)
        if label and serial:
            found[label.group(1)] = (slot, serial.group(1))
    return found


def test_second_handle_on_same_token(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot, serial = token_slots(softhsm_token)[softhsm_token.label]
    key = pkcs11_hsm.generate_key(EC("P-256"), unique_label)
    monkeypatch.delenv("PKCS11_MODULE", raising=False)
    try:
        for uri in (
            f"pkcs11:serial={serial}?module-path={softhsm_token.module}",
            f"pkcs11:slot-id={slot}?module-path={softhsm_token.module}",
            f"pkcs11:token={softhsm_token.label};serial={serial}?module-path="
            f"{softhsm_token.module}&pin-value={softhsm_token.pin}",
            f"pkcs11:token={softhsm_token.label}",  # the default SoftHSM2 path: same module
        ):
            with hsmbridge.open(uri, pin=softhsm_token.pin) as second:
                assert second.get_key(unique_label).public_key_der() == key.public_key_der()
                verify_sign(second.get_key(unique_label), Mechanism.ECDSA_SHA256)
        monkeypatch.setenv(hsmbridge.HSM_ENV, softhsm_token.uri_with_pin)
        with hsmbridge.open() as from_env:
            verify_sign(from_env.get_key(unique_label), Mechanism.ECDSA_SHA256)
        with pytest.raises(AuthenticationError):
            hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin + "-wrong")
        # closing and refusing second handles left the first one logged in
        verify_sign(key, Mechanism.ECDSA_SHA256)
        assert unique_label in {i.label for i in pkcs11_hsm.list_keys()}
    finally:
        key.delete()


def test_foreign_keys_sharing_an_id(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, made_keys: list[str]
) -> None:
    """Other applications may reuse a CKA_ID; each key must still pair with its own public half."""
    key_id = uuid.uuid4().hex[:8]
    labels = [f"{unique_label}-{n}" for n in ("rsa", "ec1", "ec2")]
    made_keys.extend(labels)
    keypairgen(softhsm_token, "rsa:1024", labels[0], key_id)
    keypairgen(softhsm_token, "EC:secp256r1", labels[1], key_id)
    keypairgen(softhsm_token, "EC:secp384r1", labels[2], key_id)
    listed = {i.label: i.spec for i in pkcs11_hsm.list_keys() if i.label in labels}
    assert listed == dict(zip(labels, [RSA(1024), EC("P-256"), EC("P-384")], strict=True))
    verify_sign(pkcs11_hsm.get_key(labels[0]), Mechanism.RSA_PKCS1_SHA256)
    verify_sign(pkcs11_hsm.get_key(labels[1]), Mechanism.ECDSA_SHA256)
    verify_sign(pkcs11_hsm.get_key(labels[2]), Mechanism.ECDSA_SHA384)


def test_private_key_without_public_object(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, unique_label: str, made_keys: list[str]
) -> None:
    """Another application deleted the public half: signing works, exporting fails clearly."""
    made_keys.append(unique_label)
    key_id = uuid.uuid4().hex[:8]
    keypairgen(softhsm_token, "EC:secp384r1", unique_label, key_id)
    tool(softhsm_token, "--delete-object", "--type", "pubkey", "--id", key_id)
    [info] = [i for i in pkcs11_hsm.list_keys() if i.label == unique_label]
    assert info.spec == EC("P-384")
    key = pkcs11_hsm.get_key(unique_label)
    assert key.sign(b"still signs", "ecdsa-sha384")
    with pytest.raises(KeyNotFound, match="public"):
        key.public_key_pem()
