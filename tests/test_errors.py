"""Bad input gets a specific error from hsmbridge's tree, and never leaks a secret.

Every exception these tests provoke goes through :func:`raises`, which checks
its message, repr and whole formatted chain for the distinctive PINs and
plaintexts used here; every test also checks the ``hsmbridge`` log at DEBUG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from oracles import crypto_encrypt

import hsmbridge
from hsmbridge import (
    EC,
    HSM,
    RSA,
    AuthenticationError,
    ConfigurationError,
    DecryptionFailed,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    Key,
    KeyNotFound,
    Mechanism,
    MechanismNotSupported,
    ModuleLoadError,
    TokenNotFound,
)
from hsmbridge.testing import SoftToken
from hsmbridge.uri import parse_nethsm_uri, parse_pkcs11_uri

WRONG_PIN = "Wr0ng-PIN-quokka-5521"
OTHER_WRONG_PIN = "Other-PIN-narwhal-8830"
URI_PIN = "Uri-PIN-pangolin-1187"
PLAINTEXT = b"Plaintext-Zebra-9913-card-4111111111111111"
SECRETS = [WRONG_PIN, OTHER_WRONG_PIN, URI_PIN, PLAINTEXT.decode(), PLAINTEXT.hex()]


def assert_no_secret(text: str, *extra: str) -> None:
    for secret in (*SECRETS, *extra):
        assert secret not in text, f"secret {secret!r} leaked into: {text!r}"


def exception_text(exc: BaseException) -> str:
    """Message, repr, args and the whole chained traceback of an exception."""
    parts = [str(exc), repr(exc), repr(exc.args)]
    parts += traceback.format_exception(exc)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        parts.append(exception_text(cause))
    return "\n".join(parts)


@contextlib.contextmanager
def raises(
    cls: type[HSMError], match: str | None = None
) -> Iterator[pytest.ExceptionInfo[HSMError]]:
    """pytest.raises that also asserts the error leaks no secret."""
    with pytest.raises(cls, match=match) as info:
        yield info
    assert isinstance(info.value, HSMError)
    assert info.value.message, "every error says what was wrong"
    assert_no_secret(exception_text(info.value))


@pytest.fixture(autouse=True)
def clean_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="hsmbridge")
    yield
    for record in caplog.records:
        assert_no_secret(record.getMessage())
        assert_no_secret(repr(record.args))
    assert_no_secret(caplog.text)


@pytest.fixture(scope="module")
def rsa_key(pkcs11_hsm: HSM) -> Iterator[Key]:
    key = pkcs11_hsm.generate_key(
        RSA(2048), f"err-{uuid.uuid4().hex[:8]}", usage={"sign", "decrypt"}
    )
    yield key
    key.delete()


@pytest.fixture(scope="module")
def ec_key(pkcs11_hsm: HSM) -> Iterator[Key]:
    key = pkcs11_hsm.generate_key(EC("P-256"), f"err-{uuid.uuid4().hex[:8]}")
    yield key
    key.delete()


def encrypt(key: Key, mech: Mechanism, plaintext: bytes = PLAINTEXT) -> bytes:
    public = serialization.load_pem_public_key(key.public_key_pem().encode())
    return crypto_encrypt(public, plaintext, mech)


# -- PINs --------------------------------------------------------------------------------


def test_wrong_pin(softhsm_tokens: dict[str, SoftToken]) -> None:
    """On the secondary token, which this process has not logged in to yet (or, if
    another test did, through the check of a second handle's PIN)."""
    secondary = softhsm_tokens["secondary"]
    with raises(AuthenticationError, match="PIN"):
        hsmbridge.open(secondary.uri, pin=WRONG_PIN)
    with raises(AuthenticationError):
        hsmbridge.open(f"{secondary.uri}&pin-value={OTHER_WRONG_PIN}")
    with hsmbridge.open(secondary.uri, pin=secondary.pin) as hsm:
        assert hsm.list_keys() is not None
        with raises(AuthenticationError):  # a second handle with another PIN
            hsmbridge.open(secondary.uri, pin=WRONG_PIN)


def test_no_pin(softhsm_token: SoftToken, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMBRIDGE_PIN", raising=False)
    with raises(ConfigurationError, match="PIN"):
        hsmbridge.open(softhsm_token.uri)
    with raises(ConfigurationError, match="NO_SUCH_PIN_VAR"):
        hsmbridge.open(f"{softhsm_token.uri}&pin-env=NO_SUCH_PIN_VAR")
    with raises(ConfigurationError, match="pin-source"):
        hsmbridge.open(f"{softhsm_token.uri}&pin-source=/nonexistent/pin.txt")


def test_secrets_stay_out_of_reprs(
    softhsm_token: SoftToken, pkcs11_hsm: HSM, rsa_key: Key, tmp_path: Path
) -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=t?pin-value={URI_PIN}")
    assert uri.pin is not None and uri.pin.value == URI_PIN
    assert_no_secret(repr(uri) + str(uri.pin) + repr(uri.pin) + uri.describe())
    token = SoftToken("t", URI_PIN, WRONG_PIN, tmp_path / "c.conf", "/m.so")
    assert_no_secret(repr(token))
    assert_no_secret(repr(pkcs11_hsm) + repr(rsa_key) + repr(rsa_key.info), softhsm_token.uri)
    assert rsa_key.decrypt(encrypt(rsa_key, Mechanism.RSA_OAEP_SHA1), "rsa-oaep-sha1") == PLAINTEXT


# -- configuration -----------------------------------------------------------------------


def test_missing_or_bad_module(softhsm_token: SoftToken, tmp_path: Path) -> None:
    with raises(ModuleLoadError, match="does not exist"):
        hsmbridge.open("pkcs11:token=x?module-path=/nonexistent/libp11.so", pin=WRONG_PIN)
    not_a_library = tmp_path / "fake.so"
    not_a_library.write_text("not a shared library")
    with raises(ModuleLoadError, match="fake.so"):
        hsmbridge.open(f"pkcs11:token=x?module-path={not_a_library}&pin-value={URI_PIN}")
    assert issubclass(ModuleLoadError, ConfigurationError)


def test_unknown_token_lists_present_tokens(softhsm_tokens: dict[str, SoftToken]) -> None:
    module = softhsm_tokens["primary"].module
    with raises(TokenNotFound) as info:
        hsmbridge.open(f"pkcs11:token=no-such-token?module-path={module}", pin=WRONG_PIN)
    for token in softhsm_tokens.values():
        assert repr(token.label) in info.value.message
    with raises(TokenNotFound, match="hsmbridge-test"):
        hsmbridge.open(f"pkcs11:serial=ffffffffffffffff?module-path={module}", pin=WRONG_PIN)
    with raises(TokenNotFound):
        hsmbridge.open(f"pkcs11:slot-id=4294967295?module-path={module}", pin=WRONG_PIN)


BAD_URIS = {
    "empty": "",
    "unknown-scheme": "pkcs12:token=x?pin-value=" + URI_PIN,
    "pin-in-path": "pkcs12:token=x;pin-value=" + URI_PIN,
    "uppercase-scheme-no-query": "PKCS11:token=x&pin-value=" + URI_PIN,
    "unknown-path-attribute": "pkcs11:tokn=x?pin-value=" + URI_PIN,
    "unknown-query-attribute": "pkcs11:token=x?pin=" + URI_PIN,
    "attribute-without-value": "pkcs11:token;serial=1",
    "slot-id-not-a-number": "pkcs11:slot-id=first?pin-value=" + URI_PIN,
    "nethsm-without-user": "nethsm://host:8443",
    "nethsm-password-in-userinfo": "nethsm://operator:" + URI_PIN + "@host:8443",
    "nethsm-password-parameter": "nethsm://operator@host:8443?password=" + URI_PIN,
    "nethsm-bad-port": "nethsm://operator@host:port",
    "nethsm-no-host": "nethsm://operator@",
}


@pytest.mark.parametrize("uri", list(BAD_URIS.values()), ids=list(BAD_URIS))
def test_bad_uri(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hsmbridge.HSM_ENV, raising=False)
    with raises(ConfigurationError):
        hsmbridge.open(uri)


def test_bad_uri_parsers_directly() -> None:
    with raises(ConfigurationError):
        parse_pkcs11_uri("nethsm://operator@host?pin-value=" + URI_PIN)
    with raises(ConfigurationError):
        parse_nethsm_uri("pkcs11:token=x?pin-value=" + URI_PIN)


def test_closed_handle(softhsm_token: SoftToken, rsa_key: Key) -> None:
    second = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    key = second.get_key(rsa_key.label)
    second.close()
    second.close()  # idempotent
    with raises(HSMUnavailable, match="closed"):
        second.list_keys()
    with raises(HSMUnavailable, match="closed"):
        key.sign(PLAINTEXT, "rsa-pkcs1-sha256")
    assert rsa_key.sign(b"the first handle is unaffected", "rsa-pkcs1-sha256")


# -- keys and key specs --------------------------------------------------------------------


def test_unknown_key(pkcs11_hsm: HSM, unique_label: str) -> None:
    with raises(KeyNotFound, match=unique_label):
        pkcs11_hsm.get_key(unique_label)
    with raises(KeyNotFound):
        pkcs11_hsm.get_key(key_id="00" * 16)
    with raises(InvalidInput):
        pkcs11_hsm.get_key()
    with raises(InvalidInput, match="hex"):
        pkcs11_hsm.get_key(key_id="not-hex")


def test_bad_key_specs(pkcs11_hsm: HSM, unique_label: str) -> None:
    with raises(InvalidInput, match="1000"):
        RSA(1000)
    with raises(InvalidInput, match="P-999"):
        EC("P-999")
    with raises(InvalidInput):
        hsmbridge.parse_key_spec("dsa:2048")
    with raises(InvalidInput, match="label"):
        pkcs11_hsm.generate_key(EC("P-256"), "")
    with raises(InvalidInput, match="hex"):
        pkcs11_hsm.generate_key(EC("P-256"), unique_label, key_id="not-hex")
    with raises(InvalidInput, match="usage"):
        pkcs11_hsm.generate_key(EC("P-256"), unique_label, usage={"encrypt"})
    with raises(InvalidInput):
        pkcs11_hsm.generate_key("rsa:2048", unique_label)  # type: ignore[arg-type]
    assert unique_label not in {i.label for i in pkcs11_hsm.list_keys()}


# -- operations -----------------------------------------------------------------------------


def test_wrong_mechanism_for_key_type(rsa_key: Key, ec_key: Key) -> None:
    with raises(InvalidInput, match="rsa-pss-sha256"):
        rsa_key.sign(PLAINTEXT, "ecdsa-sha256")
    with raises(InvalidInput, match="ecdsa-sha256"):
        ec_key.sign(PLAINTEXT, "rsa-pkcs1-sha256")
    with raises(InvalidInput):
        ec_key.decrypt(encrypt(rsa_key, Mechanism.RSA_OAEP_SHA1), "rsa-oaep-sha1")
    with raises(InvalidInput):
        ec_key.sign_batch([PLAINTEXT, PLAINTEXT], Mechanism.RSA_PSS_SHA512)


def test_unknown_mechanism(rsa_key: Key) -> None:
    with raises(MechanismNotSupported, match="rsa-pkcs1-sha256"):
        rsa_key.sign(PLAINTEXT, "rsa-md5")
    with raises(MechanismNotSupported, match="rsa-oaep-sha1"):
        rsa_key.decrypt(encrypt(rsa_key, Mechanism.RSA_PKCS1), "rsa-x509")
    with raises(MechanismNotSupported):
        rsa_key.sign(PLAINTEXT, "rsa-oaep-sha256")


def test_oversize_input(rsa_key: Key) -> None:
    ciphertext = encrypt(rsa_key, Mechanism.RSA_PKCS1)
    with raises(InvalidInput, match="257"):
        rsa_key.decrypt(ciphertext + b"\x00", "rsa-pkcs1", allow_pkcs1v15=True)
    with raises(InvalidInput):
        rsa_key.decrypt(b"\x01" * 512, "rsa-oaep-sha1")
    with raises(InvalidInput, match="32-byte"):
        rsa_key.sign(PLAINTEXT[:33], "rsa-pkcs1-sha256", prehashed=True)
    with raises(InvalidInput, match="64-byte"):
        rsa_key.sign(PLAINTEXT[:32], "rsa-pss-sha512", prehashed=True)
    with raises(InvalidInput, match="bytes"):
        rsa_key.sign(PLAINTEXT.decode(), "rsa-pkcs1-sha256")  # type: ignore[arg-type]
    assert rsa_key.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=True) == PLAINTEXT


@pytest.mark.parametrize("mech", [Mechanism.RSA_OAEP_SHA1, Mechanism.RSA_PKCS1])
def test_corrupt_ciphertext(rsa_key: Key, mech: Mechanism) -> None:
    ciphertext = bytearray(encrypt(rsa_key, mech))
    ciphertext[-1] ^= 0xFF
    ciphertext[100] ^= 0xFF
    with raises(DecryptionFailed):
        rsa_key.decrypt(bytes(ciphertext), mech, allow_pkcs1v15=True)
    with raises(DecryptionFailed):
        rsa_key.decrypt(encrypt(rsa_key, Mechanism.RSA_OAEP_SHA1)[:-1], mech, allow_pkcs1v15=True)
    assert rsa_key.decrypt(encrypt(rsa_key, mech), mech, allow_pkcs1v15=True) == PLAINTEXT


BAD_TYPES_SCRIPT = """
import sys
import hsmbridge
hsm = hsmbridge.open(sys.argv[1], pin=sys.argv[2])
calls = [
    lambda: hsm.get_key(5),
    lambda: hsm.get_key(b"label"),
    lambda: hsm.get_key(key_id=5),
    lambda: hsm.get_key(key_id=b"\\x01"),
    lambda: hsm.generate_key(hsmbridge.EC(), "bad-types", key_id=b"\\x01"),
    lambda: hsm.generate_key(hsmbridge.EC(), "bad-types", usage=5),
    lambda: hsm.generate_key(hsmbridge.EC(), "x" * 10_000_000),
    lambda: hsm.get_key("x" * 10_000),
    lambda: hsmbridge.open(sys.argv[1], pin=1234),
    lambda: hsmbridge.open(sys.argv[1], pin=sys.argv[2], max_sessions="2"),
]
key = hsm.generate_key(hsmbridge.EC(), "bad-types-key")
calls += [
    lambda: key.upload_json(min_bits="x"),
    lambda: key.sign_batch([b"m"], "ecdsa-sha256", threads="2"),
    lambda: list(key.sign_many([b"m"], "ecdsa-sha256", window="x")),
    lambda: key.sign(b"m", "ecdsa-sha256", prehashed="yes"),
    lambda: key.sign(memoryview(b"abcdef")[::2], "ecdsa-sha256"),  # non-contiguous: fine
]
for call in calls:
    try:
        call()
        print("no error")
    except Exception as exc:
        print(type(exc).__name__, flush=True)
key.delete()
"""


def test_wrong_argument_types_do_not_crash(softhsm_token: SoftToken) -> None:
    """Non-str labels and ids reached python-pkcs11, which segfaults on them: in a
    child process, so a crash fails this test rather than the run."""
    done = subprocess.run(
        [sys.executable, "-c", BAD_TYPES_SCRIPT, softhsm_token.uri, softhsm_token.pin],
        capture_output=True, text=True, timeout=120, env={**os.environ, **softhsm_token.env()},
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout} {done.stderr[-2000:]}"
    assert done.stdout.split() == ["InvalidInput"] * 8 + ["ConfigurationError"] + [
        "InvalidInput"
    ] * 5 + ["no", "error"]


# -- a fresh process: a real C_Login failure and a token with a distinctive PIN -------------

LEAK_SCRIPT = """
import io, json, logging, os, sys, tempfile, traceback
from pathlib import Path
from hsmbridge.testing import make_tokens
pin, wrong, plaintext = sys.argv[1], sys.argv[2], sys.argv[3].encode()
[token] = make_tokens(Path(tempfile.mkdtemp()), ["leak"], pin=pin)
os.environ["SOFTHSM2_CONF"] = str(token.conf)
import hsmbridge
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hsmbridge.uri import parse_pkcs11_uri
log = io.StringIO()
handler = logging.StreamHandler(log)
handler.setLevel(logging.DEBUG)
logging.getLogger("hsmbridge").addHandler(handler)
logging.getLogger("hsmbridge").setLevel(logging.DEBUG)
texts, kinds = [], []

def attempt(call):
    try:
        call()
    except hsmbridge.HSMError as exc:
        kinds.append(type(exc).__name__)
        texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])

attempt(lambda: hsmbridge.open(token.uri, pin=wrong))  # a real C_Login refusal
hsm = hsmbridge.open(token.uri_with_pin)
texts += [repr(hsm), repr(token), repr(parse_pkcs11_uri(token.uri_with_pin))]
attempt(lambda: hsmbridge.open(token.uri, pin=wrong))  # the second-handle check
key = hsm.generate_key(hsmbridge.RSA(2048), "leak", usage={"sign", "decrypt"})
oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
ciphertext = key.public_key().encrypt(plaintext, oaep)
assert key.decrypt(ciphertext, "rsa-oaep-sha1") == plaintext
assert key.decrypt_batch([ciphertext] * 4, "rsa-oaep-sha1") == [plaintext] * 4
attempt(lambda: key.decrypt(ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), "rsa-oaep-sha1"))
attempt(lambda: key.decrypt(ciphertext, "rsa-oaep-sha256"))
attempt(lambda: key.sign(plaintext, "ecdsa-sha256"))
attempt(lambda: key.sign(plaintext, "rsa-pss-sha256", prehashed=True))
attempt(lambda: hsmbridge.open("pkcs11:token=nope?module-path=" + token.module, pin=pin))
attempt(lambda: hsmbridge.open("pkcs11:token=nope?pin-value=" + pin + "&bad=1"))
attempt(lambda: hsmbridge.open("pkcs1:token=leak?pin-value=" + pin))
texts += [repr(key), repr(hsm.list_keys())]
hsm.close()
print(json.dumps({"kinds": kinds, "texts": texts, "log": log.getvalue()}))
"""


def test_no_secret_leaks_in_a_fresh_process(tmp_path: Path) -> None:
    pin = "Fresh-PIN-okapi-" + uuid.uuid4().hex[:6]
    wrong = "Fresh-WRONG-axolotl-" + uuid.uuid4().hex[:6]
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-c", LEAK_SCRIPT, pin, wrong, PLAINTEXT.decode()],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kinds"] == [
        "AuthenticationError",
        "AuthenticationError",
        "DecryptionFailed",
        "MechanismNotSupported",
        "InvalidInput",
        "InvalidInput",
        "TokenNotFound",
        "ConfigurationError",
        "ConfigurationError",
    ]
    everything = "\n".join([*report["texts"], report["log"], done.stderr])
    assert_no_secret(everything, pin, wrong)
