"""Any PKCS#11 module: p11-kit's proxy and client, module-name, slot and library
attributes, keys named by URI, token profiles, fork, busy tokens, a module an
application already initialised.

The conformance suite runs on opencryptoki, tpm2-pkcs11 and NSS softokn too
(``scripts/conformance.sh``, which starts their daemons); these tests need only
SoftHSM2 and p11-kit, which ``scripts/setup.sh --test`` installs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from oracles import crypto_encrypt

import hsmbridge
from hsmbridge import (
    EC,
    HSM,
    RSA,
    AmbiguousKey,
    DecryptionFailed,
    HSMError,
    InvalidInput,
    KeyNotFound,
    Mechanism,
    MechanismNotSupported,
    ModuleLoadError,
    TokenNotFound,
)
from hsmbridge.pkcs11 import Pkcs11HSM
from hsmbridge.pkcs11.module import P11_KIT_CONFIG_DIRS, _p11_kit_module_dir
from hsmbridge.testing import SoftToken, make_tokens

HERE = Path(__file__).parent
MODULE_DIR = _p11_kit_module_dir()
P11_KIT_PROXY = os.path.join(os.path.dirname(MODULE_DIR), "p11-kit-proxy.so")
P11_KIT_CLIENT = os.path.join(MODULE_DIR, "p11-kit-client.so")
SOFTOKN = os.path.join(os.path.dirname(MODULE_DIR), "libsoftokn3.so")


def need(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed (apt-get install {package})")


def signs(key: hsmbridge.Key, count: int = 40) -> None:
    """A batch of ECDSA signatures, each verified with cryptography."""
    messages = [f"m{i}".encode() for i in range(count)]
    public = serialization.load_pem_public_key(key.public_key_pem().encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for message, signature in zip(
        messages, key.sign_batch(messages, "ecdsa-sha256", threads=2), strict=True
    ):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


# -- p11-kit ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def p11_kit_server(softhsm_tokens: dict[str, SoftToken]) -> Iterator[str]:
    """``p11-kit server`` exporting the secondary SoftHSM2 token; its socket address."""
    need(P11_KIT_CLIENT, "p11-kit-modules")
    if shutil.which("p11-kit") is None:
        pytest.skip("p11-kit is not installed (apt-get install p11-kit)")
    token = softhsm_tokens["secondary"]
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-p11kit-"))
    socket = directory / "pkcs11.sock"
    server = subprocess.Popen(
        ["p11-kit", "server", "-f", "-n", str(socket), "--provider", token.module,
         f"pkcs11:token={token.label}"],
        env={**os.environ, **token.env()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert server.stdout is not None
    server.stdout.readline()  # P11_KIT_SERVER_ADDRESS=...: the socket is listening
    address = f"unix:path={socket}"
    old = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = address  # read by the client at C_Initialize
    try:
        yield address
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        if old is None:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        else:
            os.environ["P11_KIT_SERVER_ADDRESS"] = old
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("module", ["proxy", "client"])
def test_p11_kit_modules_open_and_run_on_the_native_engine(
    module: str,
    softhsm_tokens: dict[str, SoftToken],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """p11-kit hands out a new instance per C_GetFunctionList: hsmbridge initialises the
    one it uses, and python-pkcs11 and the native engine both run on exactly that one."""
    # hsmbridge loads SoftHSM2 itself first, as the rest of the suite does: the proxy then
    # finds it initialised (a module initialised by someone else gets one session).
    request.getfixturevalue("pkcs11_hsm")
    token = softhsm_tokens["secondary"]
    if module == "proxy":
        need(P11_KIT_PROXY, "p11-kit-modules")
        path = P11_KIT_PROXY  # loads SoftHSM2 (and the others) from p11-kit's module config
        # tpm2-pkcs11, if configured there, keeps its store here rather than in $HOME
        monkeypatch.setenv("TPM2_PKCS11_STORE", str(tmp_path))
    else:
        request.getfixturevalue("p11_kit_server")
        path = P11_KIT_CLIENT
    hsm = hsmbridge.open(f"pkcs11:token={token.label}?module-path={path}", pin=token.pin)
    try:
        assert isinstance(hsm, Pkcs11HSM)
        assert hsm.module.instance_per_call and hsm.module.thread_safe
        assert hsm.native is not None, "the native engine runs on p11-kit's instance"
        key = hsm.generate_key(EC("P-256"), f"p11kit-{uuid.uuid4().hex[:8]}")
        try:
            signs(key)
            assert key.label in {info.label for info in hsm.list_keys()}
        finally:
            key.delete()
    finally:
        hsm.close()


# -- module-name, library-*, slot-*, x- ---------------------------------------------------


def test_module_name_resolves_through_p11_kit_config(softhsm_token: SoftToken) -> None:
    if not any(
        os.path.isfile(os.path.join(os.path.expanduser(d), "softhsm2.module"))
        for d in P11_KIT_CONFIG_DIRS
    ):
        pytest.skip("no p11-kit module config softhsm2.module (apt-get install softhsm2)")
    hsm = hsmbridge.open(f"pkcs11:token={softhsm_token.label}?module-name=softhsm2", pin="1234")
    try:
        assert isinstance(hsm, Pkcs11HSM)
        assert hsm.module.path == os.path.realpath(softhsm_token.module)
    finally:
        hsm.close()


def test_unknown_module_name_is_refused() -> None:
    with pytest.raises(ModuleLoadError, match="module-name matches no p11-kit module config"):
        hsmbridge.open("pkcs11:token=t?module-name=no-such-module-q7", pin="1234")


def test_library_and_slot_attributes_choose(softhsm_token: SoftToken) -> None:
    base = f"pkcs11:token={softhsm_token.label}"
    query = f"?module-path={softhsm_token.module}"
    right = (
        f"{base};library-manufacturer=SoftHSM;library-version=2.6"
        f";slot-manufacturer=SoftHSM%20project;x-note=kept-out{query}&x-flavour=1"
    )
    hsm = hsmbridge.open(right, pin=softhsm_token.pin)
    hsm.close()
    with pytest.raises(ModuleLoadError, match="library-manufacturer"):
        hsmbridge.open(f"{base};library-manufacturer=Acme{query}", pin=softhsm_token.pin)
    with pytest.raises(ModuleLoadError, match="library-version"):
        hsmbridge.open(f"{base};library-version=9.9{query}", pin=softhsm_token.pin)
    with pytest.raises(TokenNotFound):
        hsmbridge.open(f"{base};slot-description=elsewhere{query}", pin=softhsm_token.pin)
    with pytest.raises(TokenNotFound):
        hsmbridge.open(f"{base};slot-manufacturer=Acme{query}", pin=softhsm_token.pin)


# -- keys named by URI ----------------------------------------------------------------------


@pytest.fixture
def named_key(pkcs11_hsm: HSM) -> Iterator[hsmbridge.Key]:
    key = pkcs11_hsm.generate_key(EC("P-256"), f"named-{uuid.uuid4().hex[:8]}")
    yield key
    key.delete()


def test_get_key_by_uri(pkcs11_hsm: HSM, named_key: hsmbridge.Key) -> None:
    hex_id = "".join(f"%{b:02x}" for b in bytes.fromhex(named_key.id))
    for uri in (
        f"pkcs11:object={named_key.label};type=private",
        f"pkcs11:id={hex_id}",
        f"pkcs11:object={named_key.label};id={hex_id};type=public",
    ):
        found = pkcs11_hsm.get_key(uri=uri)
        assert (found.label, found.id) == (named_key.label, named_key.id)
    with pytest.raises(KeyNotFound):
        pkcs11_hsm.get_key(uri="pkcs11:object=no-such-key-q7")
    with pytest.raises(InvalidInput, match="type"):
        pkcs11_hsm.get_key(uri=f"pkcs11:object={named_key.label};type=cert")
    with pytest.raises(InvalidInput, match="names no key"):
        pkcs11_hsm.get_key(uri="pkcs11:type=private")
    with pytest.raises(InvalidInput, match="this handle is on"):
        pkcs11_hsm.get_key(uri=f"pkcs11:token=other;object={named_key.label}")


def test_open_with_an_object_exposes_the_key(
    softhsm_token: SoftToken, named_key: hsmbridge.Key, pkcs11_hsm: HSM
) -> None:
    uri = f"{softhsm_token.uri.replace('?', f';object={named_key.label};type=private?')}"
    with hsmbridge.open(uri, pin=softhsm_token.pin) as hsm:
        assert (hsm.key.label, hsm.key.id) == (named_key.label, named_key.id)
        signs(hsm.key, 4)
    with (
        hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin) as hsm,
        pytest.raises(InvalidInput, match="names no key"),
    ):
        _ = hsm.key
    with pytest.raises(KeyNotFound):
        hsmbridge.open(softhsm_token.uri.replace("?", ";object=none-q7?"), pin=softhsm_token.pin)
    # Another application made a second key with the same label: the URI names two.
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    with pkcs11_hsm.pool.admin() as session:  # type: ignore[attr-defined]
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        twin = params.generate_keypair(store=True, label=named_key.label)
    try:
        with pytest.raises(AmbiguousKey):
            hsmbridge.open(
                softhsm_token.uri.replace("?", f";object={named_key.label}?"),
                pin=softhsm_token.pin,
            )
    finally:
        with pkcs11_hsm.pool.admin():  # type: ignore[attr-defined]
            for obj in twin:
                obj.destroy()


# -- what is learned about a token -----------------------------------------------------------


def test_supported_mechanisms_are_probed_before_any_decrypt(softhsm_token: SoftToken) -> None:
    """SoftHSM2 lists CKM_RSA_PKCS_OAEP but does only SHA-1 (docs/design.md, fact 6)."""
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin) as hsm:
        offered = hsm.supported_mechanisms()
    assert Mechanism.RSA_OAEP_SHA1 in offered
    for mech in (Mechanism.RSA_OAEP_SHA256, Mechanism.RSA_OAEP_SHA384, Mechanism.RSA_OAEP_SHA512):
        assert mech not in offered


def test_one_session_pool_answers_an_unsupported_hash_at_once(softhsm_token: SoftToken) -> None:
    """With max_sessions=1 the failing operation holds the only session: the mechanism
    error must come back, not a wait for a session (HSMUnavailable after 30 s)."""
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, max_sessions=1) as hsm:
        assert isinstance(hsm, Pkcs11HSM) and hsm.pool.max_workers == 1
        key = hsm.generate_key(RSA(2048), f"one-{uuid.uuid4().hex[:8]}", usage="decrypt")
        try:
            public = serialization.load_pem_public_key(key.public_key_pem().encode())
            ciphertext = crypto_encrypt(public, b"x", Mechanism.RSA_OAEP_SHA256)
            with pytest.raises(MechanismNotSupported, match="rsa-oaep-sha1"):
                key.decrypt(ciphertext, "rsa-oaep-sha256")
            with pytest.raises(MechanismNotSupported):
                key.decrypt_batch([ciphertext] * 3, "rsa-oaep-sha256")
            # the one session is free again
            ok = crypto_encrypt(public, b"y", Mechanism.RSA_OAEP_SHA1)
            assert key.decrypt(ok, "rsa-oaep-sha1") == b"y"
        finally:
            key.delete()


def test_pool_hands_a_thread_its_own_session_when_exhausted(softhsm_token: SoftToken) -> None:
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, max_sessions=1) as hsm:
        assert isinstance(hsm, Pkcs11HSM)
        pool = hsm.pool
        with pool.session() as outer, pool.session() as inner:
            assert inner is outer  # the same thread: no wait for itself
            errors: list[BaseException] = []

            def other_thread() -> None:
                try:
                    pool.acquire(timeout=0.2)
                except HSMError as exc:
                    errors.append(exc)

            import threading

            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            assert errors, "another thread still waits for the one session"
        with pool.session() as again:
            assert again is outer


def test_decrypt_failures_blame_the_ciphertext_only_where_measured(
    softhsm_token: SoftToken,
) -> None:
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin) as hsm:
        assert isinstance(hsm, Pkcs11HSM)
        assert hsm.profile.facts.name == "SoftHSM2"
        assert hsm.profile.facts.bad_padding_as_general_error
        key = hsm.generate_key(RSA(2048), f"blame-{uuid.uuid4().hex[:8]}", usage="decrypt")
        try:
            public = serialization.load_pem_public_key(key.public_key_pem().encode())
            corrupt = bytearray(crypto_encrypt(public, b"x", Mechanism.RSA_OAEP_SHA1))
            corrupt[5] ^= 0x40
            with pytest.raises(DecryptionFailed):
                key.decrypt(bytes(corrupt), "rsa-oaep-sha1")
            # The same CKR_GENERAL_ERROR from a module not known to mean bad padding by
            # it says the token failed, without blaming the ciphertext.
            hsm.profile.facts = replace(hsm.profile.facts, bad_padding_as_general_error=False)
            with pytest.raises(HSMError) as info:
                key.decrypt(bytes(corrupt), "rsa-oaep-sha1")
            assert not isinstance(info.value, DecryptionFailed)
            assert "GeneralError" in info.value.message
        finally:
            key.delete()


def test_profile_of_an_unmeasured_module_is_one_session() -> None:
    from hsmbridge.pkcs11.profile import UNKNOWN, measured_facts

    assert measured_facts("Acme", "Acme", "HSM 9").concurrent_sessions is False
    assert measured_facts("Acme", "Acme", "HSM 9") is UNKNOWN
    tpm2 = measured_facts("tpm2-software.github.io", "IBM", "SW   TPM")
    assert not tpm2.concurrent_sessions and "#843" in tpm2.note
    # behind p11-kit the token decides
    assert measured_facts("PKCS#11 Kit", "SoftHSM project", "SoftHSM v2").name == "SoftHSM2"


def test_max_sessions_from_the_uri(softhsm_token: SoftToken) -> None:
    with hsmbridge.open(f"{softhsm_token.uri}&x-max-sessions=2", pin=softhsm_token.pin) as hsm:
        assert isinstance(hsm, Pkcs11HSM) and hsm.pool.max_workers == 2
    with hsmbridge.open(
        f"{softhsm_token.uri}&x-max-sessions=2", pin=softhsm_token.pin, max_sessions=3
    ) as hsm:
        assert isinstance(hsm, Pkcs11HSM) and hsm.pool.max_workers == 3
    with pytest.raises(InvalidInput, match="max_sessions"):
        hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, max_sessions="2")


# -- processes: fork, several at once, an application that loaded the module first -------------


def _fresh_softhsm(tmp_path: Path, *conf_lines: str) -> tuple[SoftToken, dict[str, str]]:
    [token] = make_tokens(tmp_path, ["proc"])
    with token.conf.open("a") as conf:
        conf.writelines(line + "\n" for line in conf_lines)
    env = {**os.environ, **token.env()}
    return token, env


@pytest.mark.parametrize("reset_on_fork", ["true", "false"])
def test_forked_workers_initialise_again_and_sign(tmp_path: Path, reset_on_fork: str) -> None:
    """gunicorn --preload: a parent opens, forks four workers; each signs 500 items
    and verifies. SoftHSM2 with library.reset_on_fork=true behaves as PKCS#11 says
    (a child must C_Initialize again); with false it keeps the parent's state."""
    token, env = _fresh_softhsm(tmp_path, f"library.reset_on_fork = {reset_on_fork}")
    done = subprocess.run(
        [sys.executable, str(HERE / "proc_workers.py"), token.uri_with_pin],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 of 4 workers signed and verified 500 items" in done.stdout
    assert "CRYPTOKI_NOT_INITIALIZED" not in done.stderr


def test_forked_workers_on_p11_kit_client(
    p11_kit_server: str, softhsm_tokens: dict[str, SoftToken]
) -> None:
    token = softhsm_tokens["secondary"]
    done = subprocess.run(
        [sys.executable, str(HERE / "proc_workers.py"),
         f"pkcs11:token={token.label}?module-path={P11_KIT_CLIENT}&pin-value={token.pin}"],
        env={**os.environ, "P11_KIT_SERVER_ADDRESS": p11_kit_server},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_processes_opening_at_the_same_moment(tmp_path: Path) -> None:
    """Eight processes open one token at once, twice: every one succeeds
    (before: about a quarter failed, some with a raw pkcs11 exception)."""
    from proc_workers import open_list_close

    token, env = _fresh_softhsm(tmp_path)
    keys = "import hsmbridge, sys\nwith hsmbridge.open(sys.argv[1]) as h:\n" + "".join(
        f"    h.generate_key(hsmbridge.EC('P-256'), 'busy-{i}')\n" for i in range(6)
    )  # in a child of its own: this process's SoftHSM2 reads another config
    subprocess.run([sys.executable, "-c", keys, token.uri_with_pin], env=env, check=True)
    context = multiprocessing.get_context("spawn")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]  # the spawned children inherit it
    try:
        outcomes: list[str] = []
        with context.Manager() as manager:
            for _ in range(2):
                barrier = manager.Barrier(8)
                with context.Pool(8) as pool:
                    outcomes += pool.map(open_list_close, [(barrier, token.uri_with_pin)] * 8)
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old
    assert outcomes == ["ok"] * 16, [o for o in outcomes if o != "ok"]


APP_FIRST = """
import os, sys, pkcs11, hsmbridge
from pkcs11 import KeyType, Mechanism
symlink, pin = sys.argv[1], sys.argv[2]
# The application uses python-pkcs11 itself, loading the module by its symlink.
lib = pkcs11.lib(symlink)
token = lib.get_token(token_label="proc")
session = token.open(rw=True, user_pin=pin)
pub, priv = session.generate_keypair(KeyType.RSA, 2048, store=False, label="app")
assert len(priv.sign(b"before", mechanism=Mechanism.SHA256_RSA_PKCS)) == 256
# hsmbridge opens the same file by its real path: shares the module, re-initialises nothing.
hsm = hsmbridge.open(f"pkcs11:token=proc?module-path={os.path.realpath(symlink)}", pin=pin)
assert hsm.module.shared and not hsm.module.thread_safe and hsm.pool.max_workers == 1
key = hsm.generate_key(hsmbridge.EC("P-256"), "bridge")
assert len(key.sign_batch([b"a", b"b", b"c"], "ecdsa-sha256")) == 3
# the application's session and key still work
assert len(priv.sign(b"after", mechanism=Mechanism.SHA256_RSA_PKCS)) == 256
key.delete()
hsm.close()
print("shared")
"""


def test_application_loaded_the_module_first_by_its_symlink(tmp_path: Path) -> None:
    token, env = _fresh_softhsm(tmp_path)
    link = tmp_path / "libp11-link.so"
    link.symlink_to(token.module)
    done = subprocess.run(
        [sys.executable, "-c", APP_FIRST, str(link), token.pin],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "shared"


# -- NSS softokn: C_Initialize arguments through x-init-reserved -----------------------------


def test_nss_softokn_opens_with_init_arguments(tmp_path: Path, caplog: Any) -> None:
    need(SOFTOKN, "libnss3")
    caplog.set_level(logging.INFO, logger="hsmbridge")
    db = tmp_path / "nssdb"
    db.mkdir()
    init = f"configdir='sql:{db}' certPrefix='' keyPrefix='' secmod='secmod.db' flags="
    from urllib.parse import quote

    from hsmbridge.pkcs11.module import load_module

    module = load_module(SOFTOKN, init_reserved=init)
    [db_token] = [
        s.get_token()
        for s in module.lib.get_slots(token_present=True)
        if s.get_token().label == "NSS Certificate DB"
    ]
    with db_token.open(rw=True, so_pin="") as so_session:  # a new database: set the PIN
        so_session.init_pin("nss-pin-1")
    uri = (
        f"pkcs11:token=NSS%20Certificate%20DB?module-path={SOFTOKN}"
        f"&x-init-reserved={quote(init, safe='')}"
    )
    with hsmbridge.open(uri, pin="nss-pin-1") as hsm:
        key = hsm.generate_key(RSA(2048), f"nss-{uuid.uuid4().hex[:6]}", usage="decrypt")
        # NSS refuses CKA_ALLOWED_MECHANISMS/CKA_COPYABLE (measured): the template
        # steps down once, and the usage flags still hold in the token
        assert isinstance(hsm, Pkcs11HSM)
        assert "CKA_ALLOWED_MECHANISMS" in (hsm.profile.templates.refused or "")
        assert {i.label: i.usage for i in hsm.list_keys()}[key.label] == {"decrypt"}
        public = serialization.load_pem_public_key(key.public_key_pem().encode())
        ciphertext = crypto_encrypt(public, b"nss", Mechanism.RSA_OAEP_SHA256)
        assert key.decrypt(ciphertext, "rsa-oaep-sha256") == b"nss"
        key.delete()
        # NSS has CKM_RSA_X_509 but cannot keep a key to it: no raw key is made there
        with pytest.raises(hsmbridge.MechanismNotSupported, match="CKA_ALLOWED_MECHANISMS"):
            hsm.generate_key(RSA(2048), f"nss-raw-{uuid.uuid4().hex[:6]}", usage="decrypt-raw")
        assert Mechanism.RSA_RAW not in hsm.supported_mechanisms()
        assert not [i for i in hsm.list_keys() if i.label.startswith("nss-raw-")]
    other = init.replace("nssdb", "elsewhere")
    with pytest.raises(hsmbridge.ConfigurationError, match="x-init-reserved"):
        hsmbridge.open(
            f"pkcs11:token=x?module-path={SOFTOKN}&x-init-reserved={quote(other, safe='')}",
            pin="x",
        )
