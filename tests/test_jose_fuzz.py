"""Property tests of the JWE parser: hostile tokens end in hsmbridge's errors, never a crash.

Decryption runs against a real key (SoftHSM2), so a token that parses goes
all the way through the HSM unwrap and the content check. Longer runs:
``HYPOTHESIS_PROFILE``-free, raise ``max_examples`` below (the server's
decoders have a coverage-guided driver in scripts/fuzz_server.py).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hsmbridge import RSA, DecryptionFailed, InvalidInput, Key, MechanismNotSupported, jose
from hsmbridge.pkcs11 import Pkcs11HSM

EXPECTED = (InvalidInput, DecryptionFailed, MechanismNotSupported)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def key(pkcs11_hsm: Pkcs11HSM) -> Iterator[Key]:
    k = pkcs11_hsm.generate_key(RSA(2048), f"jwe-fuzz-{uuid.uuid4().hex[:8]}", usage={"decrypt"})
    yield k
    k.delete()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_token(key: Key, token: object) -> None:
    """The property: a result, or one of hsmbridge's expected errors with a clean message."""
    try:
        jose.decrypt_jwe(key, token)  # type: ignore[arg-type]
    except EXPECTED as exc:
        assert "Traceback" not in exc.message and len(exc.message) < 500


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from([*jose.JWE_ALGS, "dir", "none", "RSA1_5"]) | st.text(max_size=12),
        "enc": st.sampled_from(list(jose.JWE_ENCS)) | st.text(max_size=12),
        "zip": st.just("DEF"),
        "crit": json_values,
        "kid": json_values,
    },
)


@SETTINGS
@given(token=st.text(max_size=300) | st.binary(max_size=300))
@example(token="....")
@example(token="a.b.c.d.e")
def test_arbitrary_text(key: Key, token: str | bytes) -> None:
    check_token(key, token)


@SETTINGS
@given(
    header=headers,
    parts=st.lists(st.binary(max_size=300), min_size=4, max_size=4),
)
@example(header={"alg": "RSA-OAEP", "enc": "A256GCM"}, parts=[b"", b"", b"", b""])
@example(header={"alg": "RSA-OAEP", "enc": "A128CBC-HS256"}, parts=[b"\x00" * 256, b"", b"", b""])
def test_structured_tokens(key: Key, header: dict[str, object], parts: list[bytes]) -> None:
    token = ".".join([b64(json.dumps(header).encode()), *(b64(p) for p in parts)])
    check_token(key, token)
