"""The NetHSM client's own HTTP/1.1 over TLS (hsmbridge/nethsm/wire.py), against a scripted
TLS server on loopback: keep-alive reuse, chunked and 1xx answers, closed and stale
connections, and a state-changing request that still goes out exactly once."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from nethsm_fixtures import RecordingTLSServer, _request_length, make_certificate

import hsmbridge
from hsmbridge.errors import HSMUnavailable
from hsmbridge.nethsm import NetHSM
from hsmbridge.nethsm.errors import ADMINISTRATOR, ANY_USER, Answer, Call
from hsmbridge.nethsm.wire import Wires, client_context

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class ScriptedServer(RecordingTLSServer):
    """Keeps each connection open and answers each request with the next scripted
    answer; ``None`` closes the connection after reading the request,
    ``close_after`` closes it after answering."""

    def __init__(self, cert: Path, key: Path, answers: list[bytes | None], close_after: bool):
        super().__init__(cert, key)
        self.answers = list(answers)
        self.close_after = close_after
        self.requests_seen: list[tuple[int, bytes]] = []  # (connection number, request)
        self.connections = 0

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            number = self.connections
        conn.settimeout(5)
        with self._context.wrap_socket(conn, server_side=True) as tls:
            buffer = b""
            while self.answers:
                while b"\r\n\r\n" not in buffer or len(buffer) < _request_length(buffer):
                    data = tls.recv(65536)
                    if not data:
                        return
                    buffer += data
                size = _request_length(buffer)
                self.requests_seen.append((number, buffer[:size]))
                buffer = buffer[size:]
                answer = self.answers.pop(0)
                if answer is None:
                    return
                tls.sendall(answer)
                if self.close_after:
                    return


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    return make_certificate(tmp_path_factory.mktemp("wire"))


def _wires(server: ScriptedServer, fingerprint: str, maxsize: int = 4) -> Wires:
    context = client_context(True, None, fingerprint)
    return Wires("127.0.0.1", server.port, context, fingerprint, maxsize)


TIMEOUT = (2.0, 2.0)


def test_keep_alive_chunked_and_informational_answers(
    certificate: tuple[Path, Path, str],
) -> None:
    cert, key, fingerprint = certificate
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n3;ext=1\r\n:1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    informational = b"HTTP/1.1 100 Continue\r\n\r\n" + (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n"
    )
    with ScriptedServer(cert, key, [OK, chunked, informational, OK], close_after=False) as server:
        wires = _wires(server, fingerprint)
        assert wires.request("GET", "/api/v1/keys", {}, None, TIMEOUT) == Answer(200, b"{}")
        assert wires.request("GET", "/x", {}, None, TIMEOUT) == Answer(200, b'{"a":1}')
        assert wires.request("POST", "/y", {}, b"{}", TIMEOUT) == Answer(
            429, b"", {"retry-after": "3"}
        )
        assert wires.request("GET", "/keys/a b", {"Accept": "*/*"}, None, TIMEOUT).status == 200
        wires.close()
    assert server.connections == 1 and wires.opened == 1  # one keep-alive connection for all
    last = server.requests_seen[-1][1]
    assert last.startswith(b"GET /keys/a%20b HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAccept: */*\r\n" in last
    assert server.requests_seen[2][1].endswith(b"Content-Length: 2\r\n\r\n{}")


def test_connection_close_answers_are_not_reused(certificate: tuple[Path, Path, str]) -> None:
    cert, key, fingerprint = certificate
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    until_eof = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    with ScriptedServer(cert, key, [close, until_eof, OK], close_after=True) as server:
        wires = _wires(server, fingerprint)
        assert wires.request("GET", "/a", {}, None, TIMEOUT).data == b"{}"
        assert wires.request("GET", "/b", {}, None, TIMEOUT).data == b"all of it"
        assert wires.request("GET", "/c", {}, None, TIMEOUT).data == b"{}"
        wires.close()
    assert [n for n, _ in server.requests_seen] == [1, 2, 3]


def test_a_connection_the_server_closed_while_idle_is_not_used(
    certificate: tuple[Path, Path, str],
) -> None:
    """The server closes each keep-alive connection after one answer without saying so:
    a delete (never repeated) still goes out once, on a new connection, and succeeds."""
    cert, key, fingerprint = certificate
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    with ScriptedServer(cert, key, [OK, no_content], close_after=True) as server:
        hsm = hsmbridge.open(
            f"nethsm://admin@127.0.0.1:{server.port}", password="admin-pass",
            fingerprint=fingerprint, retries=0,
        )  # fmt: skip
        assert isinstance(hsm, NetHSM)
        assert hsm._get("/keys", _list_call()) == {}
        threading.Event().wait(0.2)  # the server's close reaches the idle connection
        hsm.client.request("DELETE", "/keys/k1", _delete_call(), hsm._cred("Administrator"))
        hsm.close()
    assert [n for n, _ in server.requests_seen] == [1, 2]
    assert server.requests_seen[1][1].startswith(b"DELETE /api/v1/keys/k1 HTTP/1.1\r\n")


def test_an_answer_cut_short_is_an_error_and_the_connection_is_dropped(
    certificate: tuple[Path, Path, str],
) -> None:
    cert, key, fingerprint = certificate
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"
    with ScriptedServer(cert, key, [short, None], close_after=True) as server:
        hsm = hsmbridge.open(
            f"nethsm://admin@127.0.0.1:{server.port}", password="admin-pass",
            fingerprint=fingerprint, retries=1, backoff=0.01,
        )  # fmt: skip
        assert isinstance(hsm, NetHSM)
        with pytest.raises(HSMUnavailable, match="cannot reach"):
            hsm._get("/keys", _list_call())
        hsm.close()
    assert len(server.requests_seen) == 2  # a safe read: sent again once, on a new connection
    assert hsm.client.instances[0].wires.opened == 2


def _list_call() -> Call:
    return Call("listing keys", ANY_USER, safe=True)


def _delete_call() -> Call:
    return Call("deleting key 'k1'", ADMINISTRATOR, safe=False, key_id="k1")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 2048,
    ],
    ids=["content-length", "negative", "chunked", "until-eof"],
)
def test_an_answer_longer_than_max_body_is_refused(
    certificate: tuple[Path, Path, str], answer: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server's claimed or actual body length never becomes an allocation of that size."""
    from urllib3.exceptions import ProtocolError

    from hsmbridge.nethsm import wire

    monkeypatch.setattr(wire, "MAX_BODY", 1000)
    cert, key, fingerprint = certificate
    with ScriptedServer(cert, key, [answer], close_after=True) as server:
        wires = _wires(server, fingerprint)
        with pytest.raises(ProtocolError, match=r"negative|longer than 1000 bytes"):
            wires.request("GET", "/backup", {}, None, TIMEOUT)
        wires.close()
