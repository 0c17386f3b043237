"""Key lookups on PKCS#11: listings in a constant number of searches, and
get_key's validated handle cache, on a token holding 100+ key pairs.

Other processes change the token through python-pkcs11 in a child process;
PKCS#11 calls are counted by OpenSC's pkcs11-spy between hsmbridge and
SoftHSM2, also in a child process.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from oracles import crypto_verify
from pkcs11 import Attribute, ObjectClass

import hsmbridge
from benchmarks.bench_lookup import fill_pairs
from hsmbridge import EC, RSA, AmbiguousKey, KeyNotFound, Mechanism
from hsmbridge.pkcs11 import Pkcs11HSM
from hsmbridge.pkcs11.lookup import LABELS_IN_MESSAGE
from hsmbridge.testing import SoftToken

REPO = Path(__file__).resolve().parent.parent
PAIRS = 100

#: Another application changing the token: delete, relabel or make a key pair by label.
OTHER_PROCESS = """
import os, sys, pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters
module, token_label, action, label, arg = sys.argv[1:]
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open(rw=True, user_pin=os.environ["HSMBRIDGE_PIN"]) as session:
    if action == "generate":
        ids = {Attribute.LABEL: label, Attribute.ID: bytes.fromhex(arg)}
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        params.generate_keypair(store=True, mechanism=Mechanism.EC_KEY_PAIR_GEN,
                                public_template=ids, private_template={**ids, Attribute.SIGN: True})
    else:
        found = list(session.get_objects({Attribute.LABEL: label}))
        assert found, label
        for obj in found:
            if action == "delete":
                obj.destroy()
            else:
                obj[Attribute.LABEL] = arg
"""

#: hsmbridge through pkcs11-spy: the PKCS#11 calls each lookup makes, as JSON.
SPIED = """
import collections, json, os, re, sys
import hsmbridge
log, uri, label = sys.argv[1:]
hsm = hsmbridge.open(uri)

def calls(step):
    start = os.path.getsize(log)
    step()
    with open(log, errors="replace") as f:
        f.seek(start)
        return collections.Counter(re.findall(r"^\\d+: (C_\\w+)", f.read(), re.M))

def missing():
    try:
        hsm.get_key("no-such-key-anywhere")
    except hsmbridge.KeyNotFound:
        pass

print(json.dumps({
    "list_keys": calls(hsm.list_keys),
    "keys": len(hsm.list_keys()),
    "get_key": calls(lambda: hsm.get_key(label)),
    "get_key_again": calls(lambda: hsm.get_key(label)),
    "get_key_missing": calls(missing),
}))
"""


def other_process(token: SoftToken, action: str, label: str, arg: str = "") -> None:
    done = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, token.module, token.label, action, label, arg],
        env={**os.environ, **token.env(), "HSMBRIDGE_PIN": token.pin},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def filled(pkcs11_hsm: hsmbridge.HSM) -> Iterator[list[str]]:
    """Labels of PAIRS EC P-256 key pairs made in the token for this module."""
    assert isinstance(pkcs11_hsm, Pkcs11HSM)
    labels = [f"lk-{uuid.uuid4().hex[:8]}-{i:03d}" for i in range(PAIRS)]
    with pkcs11_hsm.pool.admin() as session:
        fill_pairs(session, labels)
    yield labels
    for label in labels:
        pkcs11_hsm.get_key(label).delete()


@pytest.fixture
def hsm(pkcs11_hsm: hsmbridge.HSM) -> Pkcs11HSM:
    assert isinstance(pkcs11_hsm, Pkcs11HSM)
    return pkcs11_hsm


def verify(key: hsmbridge.Key) -> None:
    public = serialization.load_pem_public_key(key.public_key_pem().encode())
    message = b"lookup " + os.urandom(8)
    assert crypto_verify(public, key.sign(message, "ecdsa-sha256"), message, Mechanism.ECDSA_SHA256)


# -- listing ----------------------------------------------------------------------------------


def test_list_keys_lists_every_pair_once(
    hsm: Pkcs11HSM, filled: list[str], unique_label: str
) -> None:
    rsa = hsm.generate_key(RSA(1024), unique_label + "-rsa", usage={"sign", "decrypt"})
    p384 = hsm.generate_key(EC("P-384"), unique_label + "-p384")
    try:
        listed = hsm.list_keys()
        counts = collections.Counter(i.label for i in listed)
        assert all(counts[label] == 1 for label in [*filled, rsa.label, p384.label])
        by_label = {i.label: i for i in listed}
        assert {(by_label[label].spec, by_label[label].usage) for label in filled} == {
            (EC("P-256"), frozenset({"sign"}))
        }
        assert len({by_label[label].id for label in filled}) == PAIRS
        assert (by_label[rsa.label].spec, by_label[rsa.label].usage) == (
            RSA(1024),
            {"sign", "decrypt"},
        )
        assert (by_label[p384.label].spec, by_label[p384.label].usage) == (EC("P-384"), {"sign"})
        assert listed == sorted(listed, key=lambda i: (i.label, i.id))
    finally:
        rsa.delete()
        p384.delete()


def test_session_objects_never_appear(hsm: Pkcs11HSM, filled: list[str]) -> None:
    """Session keys (CKA_TOKEN=false, e.g. another program's temporary keys) are not
    the token's keys: no lookup returns them, even under a token key's label."""
    from pkcs11 import KeyType

    before = hsm.list_keys()
    key = hsm.get_key(filled[0])
    with hsm.pool.admin() as session:
        _, temporary = session.generate_keypair(KeyType.RSA, 1024, store=False, label=filled[0])
        try:
            query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.TOKEN: False}
            session_keys = {int(o.handle) for o in session.get_objects(query)}
            assert int(temporary.handle) in session_keys
            assert hsm.list_keys() == before
            assert hsm.get_key(filled[0]).handle == hsm.get_key(key_id=key.id).handle
            assert key.handle not in session_keys
        finally:
            temporary.destroy()


def test_lookups_make_a_constant_number_of_searches(
    softhsm_token: SoftToken, filled: list[str], tmp_path: Path
) -> None:
    """Counted by pkcs11-spy: searches do not grow with the number of keys."""
    spies = glob.glob("/usr/lib/*/pkcs11-spy.so") + glob.glob("/usr/lib/*/pkcs11/pkcs11-spy.so")
    assert spies, "pkcs11-spy (apt-get install opensc) is needed to count PKCS#11 calls"
    log = tmp_path / "spy.log"
    log.touch()
    uri = f"pkcs11:token={softhsm_token.label}?module-path={spies[0]}"
    done = subprocess.run(
        [sys.executable, "-c", SPIED, str(log), uri, filled[PAIRS // 2]],
        env={
            **os.environ,
            **softhsm_token.env(),
            "HSMBRIDGE_PIN": softhsm_token.pin,
            "PKCS11SPY": softhsm_token.module,
            "PKCS11SPY_OUTPUT": str(log),
        },
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    calls = json.loads(done.stdout)
    assert calls["keys"] >= PAIRS
    assert calls["list_keys"]["C_FindObjectsInit"] <= 2
    assert calls["get_key"]["C_FindObjectsInit"] <= 2
    # a cache hit: no search, one bulk attribute read (python-pkcs11: lengths, then values)
    assert calls["get_key_again"].get("C_FindObjectsInit", 0) == 0
    assert calls["get_key_again"]["C_GetAttributeValue"] == 2
    # a miss names a few labels present without reading every key
    missing = calls["get_key_missing"]
    assert missing["C_FindObjectsInit"] <= 2
    assert missing["C_GetAttributeValue"] <= 4 * (LABELS_IN_MESSAGE + 2) < 4 * calls["keys"]


def test_not_found_names_at_most_20_labels_present(hsm: Pkcs11HSM, filled: list[str]) -> None:
    with pytest.raises(KeyNotFound, match="no-such-label") as missing:
        hsm.get_key("no-such-label")
    named = re.findall(r"'([^']*)'", missing.value.message.split("keys present:")[1])
    assert len(named) == LABELS_IN_MESSAGE
    assert set(named) <= {i.label for i in hsm.list_keys()}
    assert named == sorted(named)


# -- the handle cache -------------------------------------------------------------------------


def test_get_key_by_label_and_id_hits_the_cache(hsm: Pkcs11HSM, filled: list[str]) -> None:
    listed = {i.label: i for i in hsm.list_keys()}
    for label in filled[::25]:
        first = hsm.get_key(label)
        assert first.info == listed[label]
        assert hsm.keys.cached(label, None)
        again = hsm.get_key(label)
        by_id = hsm.get_key(key_id=first.id)
        both = hsm.get_key(label, key_id=first.id.upper())
        assert {k.handle for k in (first, again, by_id, both)} == {first.handle}
        assert {k.info for k in (first, again, by_id, both)} == {listed[label]}
        verify(again)


def test_own_delete_and_generate_drop_entries(hsm: Pkcs11HSM, unique_label: str) -> None:
    key = hsm.generate_key(EC("P-256"), unique_label)
    assert hsm.get_key(unique_label).handle == hsm.get_key(key_id=key.id).handle == key.handle
    assert hsm.keys.cached(unique_label, None) and hsm.keys.cached(None, bytes.fromhex(key.id))
    key.delete()
    assert not hsm.keys.cached(unique_label, None)
    assert not hsm.keys.cached(None, bytes.fromhex(key.id))
    with pytest.raises(KeyNotFound):
        hsm.get_key(unique_label)
    assert not hsm.keys.cached(unique_label, None)  # misses are not cached
    remade = hsm.generate_key(EC("P-256"), unique_label)
    try:
        assert hsm.get_key(unique_label).id == remade.id != key.id
    finally:
        remade.delete()


def test_another_process_deleting_a_key_is_noticed(
    hsm: Pkcs11HSM, softhsm_token: SoftToken, unique_label: str
) -> None:
    key = hsm.generate_key(EC("P-256"), unique_label)
    verify(hsm.get_key(unique_label))
    other_process(softhsm_token, "delete", unique_label)
    with pytest.raises(KeyNotFound):
        hsm.get_key(unique_label)
    with pytest.raises(KeyNotFound):
        hsm.get_key(key_id=key.id)
    theirs = uuid.uuid4().hex[:16]
    other_process(softhsm_token, "generate", unique_label, theirs)
    try:
        found = hsm.get_key(unique_label)
        assert found.id == theirs
        verify(found)
    finally:
        hsm.get_key(unique_label).delete()


def test_another_process_relabelling_a_key_is_noticed(
    hsm: Pkcs11HSM, softhsm_token: SoftToken, unique_label: str
) -> None:
    # hsmbridge's own keys are not modifiable (key separation), so the key that
    # another application relabels is one it made, with python-pkcs11's defaults
    other_process(softhsm_token, "generate", unique_label, uuid.uuid4().hex[:16])
    key = hsm.get_key(unique_label)
    try:
        by_id = hsm.get_key(key_id=key.id)
        assert by_id.label == unique_label
        other_process(softhsm_token, "relabel", unique_label, unique_label + "-renamed")
        with pytest.raises(KeyNotFound):
            hsm.get_key(unique_label)
        assert hsm.get_key(key_id=key.id).label == unique_label + "-renamed"
        assert hsm.get_key(unique_label + "-renamed").handle == key.handle
    finally:
        hsm.get_key(key_id=key.id).delete()


def test_a_duplicate_made_elsewhere_is_seen_after_max_age(
    hsm: Pkcs11HSM, softhsm_token: SoftToken, unique_label: str
) -> None:
    """The documented limit: a hit cannot see a second key with its label until max_age."""
    ours = hsm.generate_key(EC("P-256"), unique_label)
    theirs = uuid.uuid4().hex[:16]
    try:
        hsm.get_key(unique_label)
        other_process(softhsm_token, "generate", unique_label, theirs)
        assert hsm.get_key(unique_label).id == ours.id  # trusted: searched just now
        max_age, hsm.keys.max_age = hsm.keys.max_age, 0.0
        try:
            with pytest.raises(AmbiguousKey, match=theirs):
                hsm.get_key(unique_label)
        finally:
            hsm.keys.max_age = max_age
    finally:
        for key_id in (ours.id, theirs):
            hsm.get_key(unique_label, key_id=key_id).delete()


def test_threads_share_the_cache(hsm: Pkcs11HSM, filled: list[str], unique_label: str) -> None:
    labels = filled[:10]
    expected = {label: hsm.get_key(label).id for label in labels}
    wrong: list[str] = []

    def look_up(n: int) -> None:
        for i in range(200):
            label = labels[(n + i) % len(labels)]
            if hsm.get_key(label).id != expected[label]:
                wrong.append(label)

    def churn() -> None:  # own generate and delete invalidate entries meanwhile
        for i in range(5):
            hsm.generate_key(EC("P-256"), f"{unique_label}-{i}").delete()

    threads = [threading.Thread(target=look_up, args=(n,)) for n in range(6)]
    threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


# -- the benchmark's quick mode ---------------------------------------------------------------


def test_lookup_benchmark_quick_mode(tmp_path: Path) -> None:
    """The benchmark runs on its own 100-pair token and checks its contenders agree
    (same listing as python-pkcs11's, get_key finds what its label search finds)."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_lookup", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert re.search(r"^\| 100 \|", done.stdout.decode(), re.M)
