"""Configuration through the official SDK: logging, network, time, backup passphrase,
TLS key/CSR/certificate (served at once), cluster CA, and metrics under the
appliance's names."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from collections.abc import Callable

import nethsm
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsmbridge.server import tls
from hsmbridge.server.app import build_app
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def test_logging_network_time(bridge_factory: Callable[..., BridgeServer]) -> None:
    bridge = bridge_factory()
    admin = bridge.sdk("admin")
    logging_config = admin.get_config_logging()  # the appliance's factory settings
    assert (logging_config.ip_address, logging_config.port) == ("0.0.0.0", 514)
    assert logging_config.log_level == nethsm.LogLevel.INFO
    server_log = logging.getLogger("hsmbridge.server")
    level = server_log.level
    try:
        admin.set_logging_config("127.0.0.1", 5514, nethsm.LogLevel.ERROR)
        logging_config = admin.get_config_logging()
        assert (logging_config.ip_address, logging_config.port) == ("127.0.0.1", 5514)
        assert logging_config.log_level == nethsm.LogLevel.ERROR
        assert server_log.level == logging.ERROR
        server_log.setLevel(logging.NOTSET)
        build_app(bridge.server.bridge)  # a server started on this state: the stored level
        assert server_log.level == logging.ERROR
    finally:
        server_log.setLevel(level)
    admin.set_network_config("10.1.2.3", "255.255.0.0", "10.1.0.1")
    network = admin.get_config_network()
    assert (network.ip_address, network.netmask, network.gateway) == (
        "10.1.2.3", "255.255.0.0", "10.1.0.1",
    )  # fmt: skip
    past = datetime.datetime(2030, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    admin.set_time(past)
    assert abs((admin.get_config_time() - past).total_seconds()) < 5
    with bridge.session(bridge.admin) as s:
        for path, body in (
            ("/config/logging", {"ipAddress": "localhost", "port": 1, "logLevel": "info"}),
            ("/config/logging", {"ipAddress": "0.0.0.0", "port": 70000, "logLevel": "info"}),
            ("/config/logging", {"ipAddress": "0.0.0.0", "port": 1, "logLevel": "loud"}),
            ("/config/network", {"ipAddress": "1.2.3.4", "netmask": "255.0.255.0",
                                 "gateway": "1.1.1.1"}),
            ("/config/time", {"time": "2030-01-01T00:00:00"}),  # no time zone
        ):  # fmt: skip
            r = s.put(f"{bridge.url}{path}", json=body, timeout=TIMEOUT)
            assert r.status_code == 400 and r.json()["message"], (path, body, r.text)
    # backup passphrase: '' while none is set, then the current one
    with pytest.raises(nethsm.NetHSMError):
        admin.set_backup_passphrase("backup-pass-1", current_passphrase="wrong-guess-0")
    admin.set_backup_passphrase("backup-pass-1")
    with pytest.raises(nethsm.NetHSMError):
        admin.set_backup_passphrase("backup-pass-2")
    admin.set_backup_passphrase("backup-pass-2", current_passphrase="backup-pass-1")
    admin.close()


def _served_cert(bridge: BridgeServer) -> x509.Certificate:
    pem = ssl.get_server_certificate((bridge.server.host, bridge.server.port))
    return x509.load_pem_x509_certificate(pem.encode())


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, x509.load_pem_x509_certificate(tls.self_signed(key))


def test_tls_key_csr_certificate_served_at_once(
    bridge_factory: Callable[..., BridgeServer], tmp_path: object
) -> None:
    bridge = bridge_factory()
    admin = bridge.sdk("admin")
    before = _served_cert(bridge)
    admin.generate_tls_key(nethsm.TlsKeyType.EC_P384)
    generated = _served_cert(bridge)  # the next handshake presents the new key's certificate
    assert generated != before
    assert isinstance(generated.public_key(), ec.EllipticCurvePublicKey)
    assert generated.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert (
        admin.get_public_key()
        == generated.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    ca_key, ca_cert = _ca()
    csr = x509.load_pem_x509_csr(
        admin.csr(common_name="127.0.0.1", organization="hsmbridge").encode()
    )
    assert csr.is_signature_valid and csr.public_key() == generated.public_key()
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_cert.subject)
        .public_key(csr.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(LOOPBACK)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    with pytest.raises(nethsm.NetHSMError):  # a certificate for another key is refused
        admin.set_certificate(ca_cert.public_bytes(serialization.Encoding.PEM))
    admin.set_certificate(leaf.public_bytes(serialization.Encoding.PEM))
    assert _served_cert(bridge) == leaf
    ca_file = tmp_path / "ca.pem"  # type: ignore[operator]
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    client = nethsm.NetHSM(bridge.hostport, verify_tls=True, ca_certs=str(ca_file))
    assert client.get_state() == nethsm.State.OPERATIONAL  # verified against the new CA
    client.close()

    with pytest.raises(nethsm.NetHSMError, match="404"):
        admin.get_cluster_ca_certificate()
    admin.set_cluster_ca_certificate(ca_cert.public_bytes(serialization.Encoding.PEM))
    assert (
        admin.get_cluster_ca_certificate()
        == ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    admin.close()


def test_metrics_use_the_appliance_names(bridge_factory: Callable[..., BridgeServer]) -> None:
    bridge = bridge_factory()
    metrics = bridge.sdk("metrics").get_metrics()
    for name in (
        "gc compactions", "gc major bytes", "gc major collections", "gc minor collections",
        "http response 200", "http response 201", "http response 204", "http response time",
        "http response total", "kv write", "log errors", "log warnings", "uptime",
        "keyOperations",
    ):  # fmt: skip
        assert name in metrics, name
    assert metrics["http response 201"] >= 2  # provisioning made two users
    assert metrics["http response total"] >= metrics["http response 201"]
    assert metrics["kv write"] >= 3 and metrics["gc major bytes"] > 0
