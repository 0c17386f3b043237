"""Namespaces through the official SDK: ``ns~user`` users, per-namespace keys, and the
appliance's rules for root (R-) and namespace (N-) administrators."""

from __future__ import annotations

from collections.abc import Callable

import nethsm
import pytest

from hsmbridge.server.testing import TIMEOUT, BridgeServer, Credentials

pytest_plugins = ["server_fixtures"]

PASS = "namespace-pass-0"
EC = nethsm.KeyType.EC_P256
ECDSA = [nethsm.KeyMechanism.ECDSA_SIGNATURE]


def _login(bridge: BridgeServer, user: str) -> nethsm.NetHSM:
    return nethsm.NetHSM(
        bridge.hostport, nethsm.Authentication(user, PASS), ca_certs=bridge.ca_file
    )


def test_namespace_isolation_and_admin_rules(
    bridge_factory: Callable[..., BridgeServer],
) -> None:
    bridge = bridge_factory()
    root = bridge.sdk("admin")
    # R-Admin creates the first N-Admin before the namespace exists ...
    assert root.add_user("N", nethsm.Role.ADMINISTRATOR, PASS, "boss", namespace="ns") == "ns~boss"
    n_admin = _login(bridge, "ns~boss")
    with pytest.raises(nethsm.NetHSMError, match="Access denied"):
        n_admin.list_keys()  # ... whose users can do nothing until it exists
    root.add_namespace("ns")
    assert root.list_namespaces() == ["ns"]
    with pytest.raises(nethsm.NetHSMError, match="Access denied"):  # now it is theirs
        root.add_user("N", nethsm.Role.OPERATOR, PASS, "late", namespace="ns")

    root_key = root.generate_key(EC, ECDSA, 256, key_id="shared-name")
    ns_key = n_admin.generate_key(EC, ECDSA, 256, key_id="shared-name")  # same ID, other namespace
    assert root_key == ns_key == "shared-name"
    assert root.list_keys() == ["shared-name"] and n_admin.list_keys() == ["shared-name"]
    assert root.get_key_public_key("shared-name") != n_admin.get_key_public_key("shared-name")
    n_admin.add_key_tag("shared-name", "t1")
    assert n_admin.get_key("shared-name").tags == ["t1"]
    assert root.get_key("shared-name").tags == []
    n_admin.delete_key_tag("shared-name", "t1")

    # N-Admin: users of its namespace only, nothing system-wide
    assert n_admin.add_user("Op", nethsm.Role.OPERATOR, PASS, "op", namespace="ns") == "ns~op"
    for namespace in (None, "other"):
        with pytest.raises(nethsm.NetHSMError, match="Access denied"):
            n_admin.add_user("X", nethsm.Role.OPERATOR, PASS, "x", namespace=namespace)
    assert set(n_admin.list_users()) == {"ns~boss", "ns~op"}
    assert {"admin", "ns~boss", "ns~op"} <= set(root.list_users())
    for call in (
        n_admin.get_config_logging,
        n_admin.list_namespaces,
        lambda: n_admin.delete_user("admin"),
    ):
        with pytest.raises(nethsm.NetHSMError, match="Access denied"):
            call()
    with pytest.raises(nethsm.NetHSMError, match="Access denied"):
        root.delete_user("ns~op")  # the namespace exists: its own admins manage it

    # a namespace operator signs with its namespace's key, and cannot name another's
    n_op = _login(bridge, "ns~op")
    n_op.sign("shared-name", nethsm.Base64.encode(b"\x01" * 32), nethsm.SignMode.ECDSA)
    with bridge.session(Credentials("admin", bridge.admin.passphrase)) as s:
        r = s.get(f"{bridge.url}/keys/ns~shared-name", timeout=TIMEOUT)
        assert r.status_code in (400, 404), r.text  # no caller can name another namespace's key

    # deleting the namespace deletes its keys (in the token too), not its users
    backend_id = bridge.server.bridge.store.get_key("ns~shared-name").backend_id  # type: ignore[union-attr]
    root.delete_namespace("ns")
    assert root.list_namespaces() == [] and root.list_keys() == ["shared-name"]
    with pytest.raises(Exception, match="no key"):
        bridge.hsm.get_key(key_id=backend_id)
    assert "ns~op" in root.list_users()
    with pytest.raises(nethsm.NetHSMError, match="Access denied"):
        n_admin.list_keys()
    root.delete_user("ns~op")  # the namespace is gone: the root admin cleans up
    root.delete_user("ns~boss")
    root.delete_key("shared-name")
    for client in (root, n_admin, n_op):
        client.close()
