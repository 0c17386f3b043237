"""Tests of the native batch engine ``hsmbridge._native.run_batch``.

``run_batch`` is driven directly with python-pkcs11 session and object handles
on a throwaway SoftHSM2 token. The module is loaded once per process (a second
``C_Initialize`` fails), so everything hangs off one module-scoped fixture.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, KeyType, TokenFlag
from pkcs11.util.ec import encode_named_curve_parameters

native: Any = pytest.importorskip("hsmbridge._native")

MODULE = os.environ.get("HSMBRIDGE_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
PIN = "1234"
SO_PIN = "5678"

OP_SIGN = 0
OP_DECRYPT = 1

CKM_RSA_PKCS = 0x1
CKM_RSA_PKCS_OAEP = 0x9
CKM_RSA_PKCS_PSS = 0xD
CKM_SHA_1 = 0x220
CKM_SHA256 = 0x250
CKM_ECDSA = 0x1041
CKG_MGF1_SHA1 = 1
CKG_MGF1_SHA256 = 2
CKF_OS_LOCKING_OK = 0x2

CKR_ENCRYPTED_DATA_INVALID = 0x40
CKR_ENCRYPTED_DATA_LEN_RANGE = 0x41
CKR_GENERAL_ERROR = 0x5
CKR_SESSION_HANDLE_INVALID = 0xB3
CORRUPT_CIPHERTEXT_RVS = (
    CKR_ENCRYPTED_DATA_INVALID,
    CKR_ENCRYPTED_DATA_LEN_RANGE,
    CKR_GENERAL_ERROR,
)
CKR_KEY_HANDLE_INVALID = 0x60
CKR_OBJECT_HANDLE_INVALID = 0x82

SHA256_DIGESTINFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")
OAEP_SHA1 = ("oaep", CKM_SHA_1, CKG_MGF1_SHA1)
PSS_SHA256 = ("pss", CKM_SHA256, CKG_MGF1_SHA256, 32)
RSA_BYTES = 256
EC_P256_BYTES = 64

pytestmark = pytest.mark.skipif(
    not os.path.exists(MODULE) or shutil.which("softhsm2-util") is None,
    reason="SoftHSM2 (module and softhsm2-util) is not installed",
)


# --------------------------------------------------------------------------
# ctypes access to the module python-pkcs11 loaded (same loaded instance)
# --------------------------------------------------------------------------


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _Mechanism(ctypes.Structure):
    _fields_ = [
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    ]


def _dll(path: str) -> ctypes.CDLL:
    dll = ctypes.CDLL(path)
    dll.C_Finalize.argtypes = [ctypes.c_void_p]
    dll.C_Finalize.restype = ctypes.c_ulong
    dll.C_Initialize.argtypes = [ctypes.c_void_p]
    dll.C_Initialize.restype = ctypes.c_ulong
    dll.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    dll.C_InitToken.restype = ctypes.c_ulong
    dll.C_SignInit.argtypes = [ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong]
    dll.C_SignInit.restype = ctypes.c_ulong
    return dll


def _reinitialise_with_os_locking(dll: ctypes.CDLL) -> bool:
    """docs/design.md, fact 1: C_Finalize(NULL), C_Initialize({CKF_OS_LOCKING_OK})."""
    rv = dll.C_Finalize(None)
    assert rv == 0, f"C_Finalize failed: 0x{rv:x}"
    args = _InitArgs(flags=CKF_OS_LOCKING_OK)
    rv = dll.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
    if rv == 0:
        return True
    rv = dll.C_Initialize(None)
    assert rv == 0, f"C_Initialize(NULL) failed: 0x{rv:x}"
    return False


def _already_loaded(real: str) -> str | None:
    """The key under which python-pkcs11 already holds this module, if any."""
    loaded: dict[str, Any] = getattr(pkcs11, "_loaded", {})
    for key in loaded:
        if os.path.realpath(key) == real:
            return key
    return None


def _known_thread_safe(real: str) -> bool:
    """Whether hsmbridge's loader initialised the module with OS locking."""
    try:
        from hsmbridge.pkcs11 import module as hb_module
    except Exception:
        return False
    loaded = getattr(hb_module, "_modules", {}).get(real)
    return bool(getattr(loaded, "thread_safe", False))


def _init_token_in_process(lib: Any, dll: ctypes.CDLL, label: str) -> None:
    """Initialise a token on SoftHSM2's free slot through the running instance."""
    for slot in lib.get_slots(token_present=True):
        token = slot.get_token()
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            so_pin = SO_PIN.encode()
            rv = dll.C_InitToken(slot.slot_id, so_pin, len(so_pin), label.encode().ljust(32))
            assert rv == 0, f"C_InitToken failed: 0x{rv:x}"
            break
    else:
        pytest.skip("the already-initialised PKCS#11 module has no free slot for a test token")
    with lib.get_token(token_label=label).open(rw=True, so_pin=SO_PIN) as so_session:
        so_session.init_pin(PIN)


# --------------------------------------------------------------------------
# fixture: one token, one login session, keys, worker sessions
# --------------------------------------------------------------------------


@dataclass
class HSM:
    path: str
    dll: ctypes.CDLL
    threads_ok: bool
    login: Any
    sessions: list[Any]
    rsa_priv: int
    rsa_pub: rsa.RSAPublicKey
    ec_priv: int
    ec_pub: ec.EllipticCurvePublicKey

    def handles(self, n: int) -> list[int]:
        if n > 1 and not self.threads_ok:
            pytest.skip("module not initialised with CKF_OS_LOCKING_OK; one thread only")
        return [int(s.handle) for s in self.sessions[:n]]


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HSM]:
    real = os.path.realpath(MODULE)
    key = _already_loaded(real)
    old_conf = os.environ.get("SOFTHSM2_CONF")
    label = "t" if key is None else f"native-{uuid.uuid4().hex[:8]}"
    dll = _dll(real)
    if key is None:
        # First load in this process: our own SoftHSM2 config and token directory.
        tmp: Path = tmp_path_factory.mktemp("softhsm")
        (tmp / "tokens").mkdir()
        conf = tmp / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tmp / 'tokens'}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ],
            check=True,
            capture_output=True,
        )
        lib = pkcs11.lib(real)  # C_Initialize(NULL) ...
        threads_ok = _reinitialise_with_os_locking(dll)  # ... then with OS locking
    else:
        # Someone else in this process owns the module: add a token to it instead.
        lib = pkcs11.lib(key)
        threads_ok = _known_thread_safe(real)
        _init_token_in_process(lib, dll, label)

    token = lib.get_token(token_label=label)
    login = token.open(rw=True, user_pin=PIN)
    private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    rsa_pub_obj, rsa_priv_obj = login.generate_keypair(
        KeyType.RSA, 2048, label="rsa", store=True, private_template=private
    )
    modulus = int.from_bytes(rsa_pub_obj[Attribute.MODULUS], "big")
    exponent = int.from_bytes(rsa_pub_obj[Attribute.PUBLIC_EXPONENT], "big")
    rsa_pub = rsa.RSAPublicNumbers(exponent, modulus).public_key()

    params = login.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    ec_pub_obj, ec_priv_obj = params.generate_keypair(
        label="ec", store=True, private_template=private
    )
    ec_point = ec_pub_obj[Attribute.EC_POINT]
    assert ec_point[0] == 0x04 and ec_point[1] == 65  # DER OCTET STRING around the point
    ec_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ec_point[2:])

    sessions = [token.open() for _ in range(3)]  # R/O, inherit the login
    yield HSM(
        path=real,
        dll=dll,
        threads_ok=threads_ok,
        login=login,
        sessions=sessions,
        rsa_priv=_handle(rsa_priv_obj),
        rsa_pub=rsa_pub,
        ec_priv=_handle(ec_priv_obj),
        ec_pub=ec_pub,
    )
    for session in sessions:
        session.close()
    login.close()
    # SoftHSM2 reads SOFTHSM2_CONF at C_Initialize: whoever initialises the
    # module next (e.g. hsmbridge's loader) should see its own config again.
    if old_conf is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old_conf


def _handle(obj: Any) -> int:
    handle = obj.handle
    assert isinstance(handle, int)
    return handle


def _sign(
    hsm: HSM,
    n_sessions: int,
    inputs: list[bytes],
    *,
    key: int | None = None,
    mechanism: int = CKM_RSA_PKCS,
    param: tuple[Any, ...] | None = None,
    out_len: int = RSA_BYTES,
    sessions: list[int] | None = None,
) -> list[Any]:
    result: list[Any] = native.run_batch(
        hsm.path,
        OP_SIGN,
        hsm.handles(n_sessions) if sessions is None else sessions,
        hsm.rsa_priv if key is None else key,
        mechanism,
        param,
        inputs,
        out_len,
        False,
    )
    return result


def _digest_info(message: bytes) -> bytes:
    return SHA256_DIGESTINFO_PREFIX + hashlib.sha256(message).digest()


def _oaep_encrypt(hsm: HSM, plaintext: bytes) -> bytes:
    return hsm.rsa_pub.encrypt(
        plaintext,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )


def _decrypt(hsm: HSM, n_sessions: int, inputs: list[bytes], stop: bool = False) -> list[Any]:
    result: list[Any] = native.run_batch(
        hsm.path,
        OP_DECRYPT,
        hsm.handles(n_sessions),
        hsm.rsa_priv,
        CKM_RSA_PKCS_OAEP,
        OAEP_SHA1,
        inputs,
        RSA_BYTES,
        stop,
    )
    return result


def _corrupt(ciphertext: bytes) -> bytes:
    """Same length, but the OAEP padding check fails."""
    return bytes([ciphertext[0] ^ 0x01]) + ciphertext[1:-1] + bytes([ciphertext[-1] ^ 0xFF])


# --------------------------------------------------------------------------
# signing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_sessions", [1, 2])
def test_rsa_pkcs1_sign(hsm: HSM, n_sessions: int) -> None:
    messages = [f"message {i}".encode() for i in range(24)]
    sigs = _sign(hsm, n_sessions, [_digest_info(m) for m in messages])
    assert len(sigs) == len(messages)
    for message, sig in zip(messages, sigs, strict=True):
        assert isinstance(sig, bytes) and len(sig) == RSA_BYTES
        hsm.rsa_pub.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())


def test_rsa_pkcs1_signatures_are_deterministic_across_parallelism(hsm: HSM) -> None:
    inputs = [_digest_info(bytes([i])) for i in range(10)]
    one = _sign(hsm, 1, inputs)
    two = _sign(hsm, 2, inputs)
    assert one == two


@pytest.mark.parametrize("n_sessions", [1, 2])
def test_rsa_pss_sign(hsm: HSM, n_sessions: int) -> None:
    messages = [f"pss {i}".encode() for i in range(12)]
    digests = [hashlib.sha256(m).digest() for m in messages]
    sigs = _sign(hsm, n_sessions, digests, mechanism=CKM_RSA_PKCS_PSS, param=PSS_SHA256)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    for message, sig in zip(messages, sigs, strict=True):
        assert isinstance(sig, bytes) and len(sig) == RSA_BYTES
        hsm.rsa_pub.verify(sig, message, pss, hashes.SHA256())
    assert len(set(sigs)) == len(sigs)  # salted


@pytest.mark.parametrize("n_sessions", [1, 2])
def test_ecdsa_p256_sign(hsm: HSM, n_sessions: int) -> None:
    messages = [f"ec {i}".encode() for i in range(40)]
    digests = [hashlib.sha256(m).digest() for m in messages]
    sigs = _sign(
        hsm, n_sessions, digests, key=hsm.ec_priv, mechanism=CKM_ECDSA, out_len=EC_P256_BYTES
    )
    for digest, sig in zip(digests, sigs, strict=True):
        assert isinstance(sig, bytes) and len(sig) == EC_P256_BYTES
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:], "big")
        der = utils.encode_dss_signature(r, s)
        hsm.ec_pub.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        r = int.from_bytes(sigs[0][:32], "big")
        s = int.from_bytes(sigs[0][32:], "big")
        hsm.ec_pub.verify(
            utils.encode_dss_signature(r, s), digests[1], ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        )


def test_short_out_len_is_retried_with_reported_length(hsm: HSM) -> None:
    # 16 bytes is too small: the token answers CKR_BUFFER_TOO_SMALL with 256,
    # run_batch retries once, and the session stays usable.
    sigs = _sign(hsm, 1, [_digest_info(b"a"), _digest_info(b"b")], out_len=16)
    for message, sig in zip([b"a", b"b"], sigs, strict=True):
        assert isinstance(sig, bytes) and len(sig) == RSA_BYTES
        hsm.rsa_pub.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())


def test_leftover_active_operation_is_finished(hsm: HSM) -> None:
    # Leave a sign operation active on the session, as an interrupted caller would.
    session = hsm.handles(1)[0]
    mech = _Mechanism(CKM_RSA_PKCS, None, 0)
    assert hsm.dll.C_SignInit(session, ctypes.byref(mech), hsm.rsa_priv) == 0
    sigs = _sign(hsm, 1, [_digest_info(b"x")], sessions=[session])
    assert isinstance(sigs[0], bytes)
    hsm.rsa_pub.verify(sigs[0], b"x", padding.PKCS1v15(), hashes.SHA256())


# --------------------------------------------------------------------------
# decryption
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_sessions", [1, 2, 3])
def test_oaep_sha1_decrypt(hsm: HSM, n_sessions: int) -> None:
    plaintexts = [os.urandom(i % 40) for i in range(30)]  # includes empty plaintexts
    ciphertexts = [_oaep_encrypt(hsm, p) for p in plaintexts]
    assert _decrypt(hsm, n_sessions, ciphertexts) == plaintexts


def test_one_and_two_sessions_give_identical_plaintexts(hsm: HSM) -> None:
    plaintexts = [f"field-{i}".encode() for i in range(40)]
    ciphertexts = [_oaep_encrypt(hsm, p) for p in plaintexts]
    one = _decrypt(hsm, 1, ciphertexts)
    two = _decrypt(hsm, 2, ciphertexts)
    assert one == two == plaintexts


def test_inputs_may_be_any_bytes_like(hsm: HSM) -> None:
    plaintexts = [b"a", b"b", b"c"]
    ct = [_oaep_encrypt(hsm, p) for p in plaintexts]
    inputs: list[Any] = [ct[0], bytearray(ct[1]), memoryview(ct[2])]
    assert _decrypt(hsm, 1, inputs) == plaintexts


@pytest.mark.parametrize("n_sessions", [1, 2])
def test_corrupt_ciphertext_does_not_poison_the_session(hsm: HSM, n_sessions: int) -> None:
    plaintexts = [f"secret {i}".encode() for i in range(24)]
    inputs = [_oaep_encrypt(hsm, p) for p in plaintexts]
    bad = {5: _corrupt(inputs[5]), 11: inputs[11][:-1], 12: b"", 17: _corrupt(inputs[17])}
    for i, ciphertext in bad.items():
        inputs[i] = ciphertext
    results = _decrypt(hsm, n_sessions, inputs)
    for i, (result, plaintext) in enumerate(zip(results, plaintexts, strict=True)):
        if i in bad:
            assert isinstance(result, int), f"item {i}: {result!r}"
        else:
            assert result == plaintext, f"item {i} after a failed item"
    assert results[5] in (CKR_ENCRYPTED_DATA_INVALID, CKR_GENERAL_ERROR)
    # SoftHSM2 2.6.1 does not check the ciphertext length, and reports every
    # failed RSA decryption as CKR_GENERAL_ERROR; other tokens use the
    # ENCRYPTED_DATA_* codes.
    for i in bad:
        assert results[i] in CORRUPT_CIPHERTEXT_RVS
    # and the sessions still work for the next batch
    assert _decrypt(hsm, n_sessions, [_oaep_encrypt(hsm, b"after")]) == [b"after"]


def test_many_corrupt_ciphertexts_on_one_session(hsm: HSM) -> None:
    good = _oaep_encrypt(hsm, b"ok")
    inputs = [good if i % 2 else _corrupt(good) for i in range(20)]
    results = _decrypt(hsm, 1, inputs)
    assert results[1::2] == [b"ok"] * 10
    assert all(r in CORRUPT_CIPHERTEXT_RVS for r in results[0::2])


def test_stop_on_error_one_session(hsm: HSM) -> None:
    inputs = [_oaep_encrypt(hsm, bytes([i])) for i in range(10)]
    inputs[3] = _corrupt(inputs[3])
    results = _decrypt(hsm, 1, inputs, stop=True)
    assert results[:3] == [bytes([0]), bytes([1]), bytes([2])]
    assert isinstance(results[3], int)
    assert results[4:] == [None] * 6


def test_stop_on_error_two_sessions(hsm: HSM) -> None:
    inputs = [_oaep_encrypt(hsm, i.to_bytes(2, "big")) for i in range(200)]
    inputs[1] = _corrupt(inputs[1])
    results = _decrypt(hsm, 2, inputs, stop=True)
    assert isinstance(results[1], int)
    for i, result in enumerate(results):
        assert result is None or i == 1 or result == i.to_bytes(2, "big")
    # The other worker stops once it sees the failure. How many items it
    # finishes meanwhile depends on scheduling (a loaded 2-core machine let it
    # do 5), so the bound is loose: most of the batch is never attempted.
    assert results.count(None) >= len(inputs) // 2


def test_without_stop_on_error_every_item_is_attempted(hsm: HSM) -> None:
    inputs = [_oaep_encrypt(hsm, bytes([i])) for i in range(10)]
    inputs[0] = _corrupt(inputs[0])
    results = _decrypt(hsm, 2, inputs, stop=False)
    assert isinstance(results[0], int)
    assert results[1:] == [bytes([i]) for i in range(1, 10)]


# --------------------------------------------------------------------------
# edges and argument checking
# --------------------------------------------------------------------------


def test_empty_input_list(hsm: HSM) -> None:
    assert _decrypt(hsm, 2, []) == []
    # a tuple works too, and stop_on_error is optional
    empty = native.run_batch(hsm.path, OP_SIGN, [1], hsm.rsa_priv, CKM_RSA_PKCS, None, (), 256)
    assert empty == []


def test_more_sessions_than_items(hsm: HSM) -> None:
    ct = _oaep_encrypt(hsm, b"only")
    assert _decrypt(hsm, 3, [ct]) == [b"only"]


def test_symlinked_module_path_finds_the_loaded_instance(hsm: HSM) -> None:
    ct = _oaep_encrypt(hsm, b"via link")
    result = native.run_batch(
        MODULE,
        OP_DECRYPT,
        hsm.handles(1),
        hsm.rsa_priv,
        CKM_RSA_PKCS_OAEP,
        OAEP_SHA1,
        [ct],
        RSA_BYTES,
        False,
    )
    assert result == [b"via link"]


def test_invalid_handles_are_item_errors(hsm: HSM) -> None:
    digest = _digest_info(b"m")
    results = _sign(hsm, 1, [digest, digest], sessions=[0xFFFFFF])
    assert results == [CKR_SESSION_HANDLE_INVALID] * 2
    results = _sign(hsm, 1, [digest], key=0xFFFFFF)
    assert results[0] in (CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID)


def test_module_not_loaded_raises_runtime_error(hsm: HSM) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        native.run_batch(
            "/nonexistent/libpkcs11.so", OP_SIGN, [1], 1, CKM_RSA_PKCS, None, [b"x"], 256, False
        )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"op": 2}, ValueError, "op must be"),
        ({"op": "sign"}, TypeError, None),
        ({"sessions": []}, ValueError, "sessions must hold"),
        ({"sessions": 5}, TypeError, "sessions must be a list"),
        ({"sessions": [7, 7]}, ValueError, "appears twice"),
        ({"sessions": [-1]}, ValueError, "session handle must be in"),
        ({"sessions": ["1"]}, TypeError, "session handle must be an int"),
        ({"key_handle": 0}, ValueError, "CK_INVALID_HANDLE"),
        ({"key_handle": -3}, ValueError, "key_handle must be in"),
        ({"mechanism": None}, TypeError, "mechanism must be an int"),
        ({"param": ("pss", 1, 2)}, ValueError, "PSS param"),
        ({"param": ("oaep", 1, 2, 3)}, ValueError, "OAEP param"),
        ({"param": ("gcm", 1)}, ValueError, "unknown param kind"),
        ({"param": [1, 2]}, TypeError, "param must be None"),
        ({"param": ("pss", "x", 2, 3)}, TypeError, "PSS hashAlg must be an int"),
        ({"inputs": b"abc"}, TypeError, "inputs must be a list"),
        ({"inputs": ["text"]}, TypeError, r"inputs\[0\] must be bytes-like"),
        ({"inputs": [b"ok", 3]}, TypeError, r"inputs\[1\] must be bytes-like"),
        ({"out_len": 0}, ValueError, "out_len must be in"),
        ({"out_len": 1 << 30}, ValueError, "out_len must be in"),
        ({"module_path": 3}, TypeError, None),
        ({"nice": -1}, ValueError, "nice must be 0-19"),
        ({"nice": 20}, ValueError, "nice must be 0-19"),
    ],
)
def test_argument_validation(
    hsm: HSM, change: dict[str, Any], error: type[Exception], match: str | None
) -> None:
    kwargs: dict[str, Any] = {
        "module_path": hsm.path,
        "op": OP_SIGN,
        "sessions": hsm.handles(1),
        "key_handle": hsm.rsa_priv,
        "mechanism": CKM_RSA_PKCS,
        "param": None,
        "inputs": [b"x"],
        "out_len": RSA_BYTES,
        "stop_on_error": False,
    }
    kwargs.update(change)
    with pytest.raises(error, match=match):
        native.run_batch(**kwargs)


def test_module_constants() -> None:
    assert native.OP_SIGN == OP_SIGN
    assert native.OP_DECRYPT == OP_DECRYPT
