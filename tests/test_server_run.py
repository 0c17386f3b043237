"""``serve()`` as its own process: self-signed certificate made once and reused,
fingerprint printed, state kept across restarts, graceful exit on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from hsmbridge.server.testing import TIMEOUT
from hsmbridge.server.tls import fingerprint
from hsmbridge.testing import SoftToken

SERVE = (
    "import sys; from hsmbridge.server.run import serve; "
    "serve(sys.argv[1], sys.argv[2], sys.argv[3])"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session(cert: Path) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = str(cert)
    return s


def _wait_until_serving(process: subprocess.Popen[bytes], url: str, cert: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate(timeout=5)[0].decode()
        assert time.monotonic() < deadline, "the server did not come up"
        if cert.exists():
            try:
                with _session(cert) as s:
                    s.get(f"{url}/health/state", timeout=2)
                return
            except requests.RequestException:
                pass
        time.sleep(0.1)


def _run(token: SoftToken, state: Path) -> str:
    """Start serve(), wait until it answers, exercise it, SIGTERM it; return its output."""
    port = _free_port()
    env = {"PATH": "/usr/bin:/bin", **token.env(), "HSMBRIDGE_PIN": token.pin}
    cmd = [sys.executable, "-c", SERVE, token.uri, f"127.0.0.1:{port}", str(state)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}/api/v1"
    cert = state / "tls-cert.pem"
    try:
        _wait_until_serving(process, url, cert)
        _exercise(url, cert)
        idle = _session(cert)  # a keep-alive TLS client that stays connected, idle
        idle.get(f"{url}/health/state", timeout=TIMEOUT)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("serve() did not stop on SIGTERM")
    idle.close()
    assert process.returncode == 0, out.decode()  # graceful: serve() returned, cleanup ran
    assert "hsmbridge serve: stopped" in out.decode()
    # the idle client did not hold the shutdown until the graceful limit ran out
    assert "timeout graceful shutdown exceeded" not in out.decode()
    return out.decode()


_results: list[dict[str, object]] = []


def _exercise(url: str, cert: Path) -> None:
    with _session(cert) as s:
        state = s.get(f"{url}/health/state", timeout=TIMEOUT).json()["state"]
        _results.append({"state": state})
        if state == "Unprovisioned":
            r = s.post(
                f"{url}/provision",
                json={
                    "unlockPassphrase": "run-unlock-passphrase",
                    "adminPassphrase": "run-admin-passphrase",
                    "systemTime": "2026-01-01T00:00:00Z",
                },
                timeout=TIMEOUT,
            )
            assert r.status_code == 204, r.text
        else:
            r = s.post(f"{url}/unlock", json={"passphrase": "run-unlock-passphrase"}, timeout=10)
            assert r.status_code == 204, r.text
            r = s.get(f"{url}/users", auth=("admin", "run-admin-passphrase"), timeout=10)
            assert r.json() == [{"user": "admin"}]
            # POST /system/reboot: the process restarts the server, which comes up Locked
            r = s.post(f"{url}/system/reboot", auth=("admin", "run-admin-passphrase"), timeout=10)
            assert r.status_code == 204, r.text
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, "the server did not come back after reboot"
                try:
                    with _session(cert) as fresh:
                        state = fresh.get(f"{url}/health/state", timeout=2).json()["state"]
                    if state == "Locked":
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1)


def test_serve_process_restart_and_sigterm(softhsm_token: SoftToken, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _results.clear()
    first = _run(softhsm_token, state)
    cert = state / "tls-cert.pem"
    print_fp = fingerprint(cert)
    assert print_fp in first  # printed for pinning
    assert (state / "tls-key.pem").stat().st_mode & 0o077 == 0  # key readable by owner only
    second = _run(softhsm_token, state)
    assert fingerprint(cert) == print_fp and print_fp in second  # reused, not remade
    assert [r["state"] for r in _results] == ["Unprovisioned", "Locked"]


def _cli(token: SoftToken, *args: str, hsm_env: bool = True) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/bin:/bin", **token.env(), "HSMBRIDGE_PIN": token.pin}
    if hsm_env:
        env["HSMBRIDGE_HSM"] = token.uri
    cmd = [sys.executable, "-m", "hsmbridge.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_cli_serve_logs_recovery_and_keeps_its_state_private(
    softhsm_token: SoftToken, tmp_path: Path
) -> None:
    """``hsmbridge serve`` logs (here: the clean-up of a half-made key) and makes the state
    directory 0700 and every file in it 0600 (database, WAL, SHM, TLS key and cert)."""
    from hsmbridge.server.state import KeyRecord, SQLiteStore

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    store = SQLiteStore(state / "hsmbridge-server.sqlite3")  # as an older version left it: 0644
    with store.transaction() as tx:
        halfmade = KeyRecord("halfmade", "EC_P256", (), "00" * 16, "x", status="pending")
        SQLiteStore.put_key(tx, halfmade)
    store.close()
    port = _free_port()
    process = _cli(
        softhsm_token, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)
    )
    cert = state / "tls-cert.pem"
    try:
        _wait_until_serving(process, f"https://127.0.0.1:{port}/api/v1", cert)
        modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
        assert state.stat().st_mode & 0o777 == 0o700
        assert {"hsmbridge-server.sqlite3-wal", "tls-key.pem", "tls-cert.pem"} <= set(modes)
        assert set(modes.values()) == {0o600}, modes
    finally:
        process.send_signal(signal.SIGTERM)
        out = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, out
    assert "removed key halfmade left pending by an interrupted request" in out, out


def test_cli_serve_refuses_a_state_dir_others_can_write(
    softhsm_token: SoftToken, tmp_path: Path
) -> None:
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(0o777)
    process = _cli(softhsm_token, "serve", "--listen", "127.0.0.1:1", "--state-dir", str(state))
    out = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 1, out  # a configuration error: one line, exit 1
    assert "writable by group or others" in out and "chmod 700" in out
    assert "Traceback" not in out


def test_cli_serve_refuses_a_pin_on_the_command_line(
    softhsm_token: SoftToken, tmp_path: Path
) -> None:
    """A pin-value in --hsm would be readable by every local user in ps for the server's life."""
    pin = "pin-in-ps-4711"
    uri = f"{softhsm_token.uri}&pin-value={pin}"
    args = ("--hsm", uri, "serve", "--listen", "127.0.0.1:1", "--state-dir", str(tmp_path / "s"))
    process = _cli(softhsm_token, *args, hsm_env=False)
    out = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 2, out
    assert "HSMBRIDGE_PIN" in out and "pin-source" in out and pin not in out
    assert not (tmp_path / "s").exists()  # refused before anything was done
