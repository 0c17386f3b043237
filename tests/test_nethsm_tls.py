"""TLS for the NetHSM backend against real loopback TLS servers: pinning, CA, verify=false."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from nethsm_fixtures import RecordingTLSServer, make_certificate

import hsmbridge
from hsmbridge import ConfigurationError, HSMUnavailable
from hsmbridge.nethsm import NetHSM

PASSWORD = "s3cret-passphrase"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[RecordingTLSServer, Path, str]]:
    cert, key, fingerprint = make_certificate(tmp_path)
    with RecordingTLSServer(cert, key) as srv:
        yield srv, cert, fingerprint


def open_hsm(port: int, query: str = "", **options: object) -> NetHSM:
    hsm = hsmbridge.open(f"nethsm://operator@127.0.0.1:{port}{query}", password=PASSWORD, **options)
    assert isinstance(hsm, NetHSM)
    return hsm


def test_wrong_fingerprint_is_refused_before_any_byte_is_sent(
    server: tuple[RecordingTLSServer, Path, str],
) -> None:
    srv, _, fingerprint = server
    wrong = hashlib.sha256(b"another certificate").hexdigest()
    hsm = open_hsm(srv.port, f"?fingerprint=sha256:{wrong}")
    with pytest.raises(ConfigurationError, match="pinned fingerprint") as info:
        hsm.health()
    hsm.close()
    srv.settle()
    assert fingerprint[:8] in info.value.message.replace(":", "").lower()  # names what it saw
    assert PASSWORD not in info.value.message
    assert srv.handshakes >= 1  # it did connect and complete the handshake...
    assert srv.all_bytes == b""  # ...and then sent nothing at all: no Authorization header


def test_right_fingerprint_connects_and_the_recorder_sees_credentials(
    server: tuple[RecordingTLSServer, Path, str],
) -> None:
    srv, _, fingerprint = server
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    for pin in (f"sha256:{fingerprint}", colons):
        hsm = open_hsm(srv.port, fingerprint=pin)
        assert hsm.health() == "Operational"
        hsm.close()
    srv.settle()
    assert b"Authorization: Basic " in srv.all_bytes  # the negative test above can fail
    assert b"GET /api/v1/health/state" in srv.all_bytes


def test_ca_file_verifies_and_system_cas_refuse(
    server: tuple[RecordingTLSServer, Path, str],
) -> None:
    srv, cert, _ = server
    with open_hsm(srv.port, f"?ca={cert}") as hsm:
        assert isinstance(hsm, NetHSM) and hsm.health() == "Operational"
    srv.settle()
    sent_before = srv.all_bytes
    hsm = open_hsm(srv.port)  # verification on by default: a self-signed cert is refused
    with pytest.raises(ConfigurationError, match="TLS verification") as info:
        hsm.health()
    hsm.close()
    srv.settle()
    assert "fingerprint=" in info.value.message
    assert srv.all_bytes == sent_before


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_false_warns_and_connects(server: tuple[RecordingTLSServer, Path, str]) -> None:
    srv, _, _ = server
    with pytest.warns(UserWarning, match="verification of the NetHSM is disabled"):
        hsm = open_hsm(srv.port, "?verify=false")
    assert hsm.health() == "Operational"
    hsm.close()
    with pytest.raises(HSMUnavailable, match="closed"):
        hsm.health()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pinning needs no warning even with chain checks off
        open_hsm(srv.port, fingerprint="00" * 32).close()


def test_bad_fingerprint_and_ca_options_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="64 hex digits"):
        open_hsm(8443, "?fingerprint=sha256:abcd")
    with pytest.raises(ConfigurationError, match="not a readable file"):
        open_hsm(8443, ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="verify must be"):
        open_hsm(8443, "?verify=maybe")
