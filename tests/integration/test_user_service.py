"""The example user service behind `tollway demo`, exercised over real sockets on 127.0.0.1."""

import http.client
import json
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tollway.examples.user_service import MAX_BODY_BYTES, make_server

pytestmark = pytest.mark.integration

TIMEOUT = 5.0  # every socket operation, join and wait below is bounded by this
ALICE = {"id": 1, "name": "alice", "email": "alice@example.com"}
CAROL = {"name": "carol", "email": "carol@example.com"}


@contextmanager
def running(db_path: Path, name: str) -> Iterator[int]:
    """Run a server in a thread; yield its port."""
    server = make_server("127.0.0.1", 0, str(db_path), name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "users.db"


@pytest.fixture
def port(db_path: Path) -> Iterator[int]:
    with running(db_path, "instance-a") as port:
        yield port


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    json: Any


def send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on an open connection; the response is read in full so the connection is reusable."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    return Reply(response.status, response.headers, json.loads(raw) if raw else None)


def call(
    port: int, method: str, path: str, body: bytes | dict[str, Any] | None = None, **headers: str
) -> Reply:
    """One request on a fresh connection. Keyword arguments become headers (X_Request_Id=...)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        return send(conn, method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    finally:
        conn.close()


# --- Reading and writing users --------------------------------------------------------------


def test_get_seeded_user(port: int) -> None:
    reply = call(port, "GET", "/users/1")
    assert reply.status == 200
    assert reply.json == {**ALICE, "instance": "instance-a"}
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["X-Instance"] == "instance-a"


def test_get_missing_user_is_404(port: int) -> None:
    reply = call(port, "GET", "/users/999")
    assert (reply.status, reply.json) == (404, {"message": "user 999 not found"})


def test_put_creates_then_replaces_a_user(port: int) -> None:
    reply = call(port, "PUT", "/users/7", CAROL, Content_Type="application/json")
    assert (reply.status, reply.json) == (200, {"id": 7, **CAROL, "instance": "instance-a"})
    assert call(port, "GET", "/users/7").json == {"id": 7, **CAROL, "instance": "instance-a"}

    call(port, "PUT", "/users/7", {"name": "Carol", "email": "c@example.org"})
    assert call(port, "GET", "/users/7").json["name"] == "Carol"


def test_put_accepts_json_whatever_the_content_type(port: int) -> None:
    assert call(port, "PUT", "/users/8", CAROL, Content_Type="text/plain").status == 200
    assert call(port, "PUT", "/users/9", CAROL).status == 200  # no Content-Type at all


def test_put_ignores_extra_fields_and_keeps_unicode(port: int) -> None:
    body = {"name": "Zoë 🚀", "email": "zoe@example.com", "admin": True}
    assert call(port, "PUT", "/users/10", body).status == 200
    assert call(port, "GET", "/users/10").json["name"] == "Zoë 🚀"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 60_000, "not valid JSON"),  # nested too deep for the parser
        (b'["carol"]', "JSON object"),
        ({"email": "c@example.com"}, 'missing field "name"'),
        ({"name": "carol"}, 'missing field "email"'),
        ({"name": 5, "email": "c@example.com"}, '"name" must be a string'),
        ({"name": "carol", "email": None}, '"email" must be a string'),
        ({"name": "", "email": "c@example.com"}, "1 to 100 characters"),
        ({"name": "x" * 101, "email": "c@example.com"}, "1 to 100 characters"),
        (b'{"name": "\\ud800", "email": "c@example.com"}', "not valid Unicode"),
    ],
)
def test_put_rejects_bad_bodies_with_400(port: int, body: bytes | dict[str, Any], message: str) -> None:
    reply = call(port, "PUT", "/users/7", body)
    assert reply.status == 400
    assert message in reply.json["message"]
    assert reply.headers["X-Instance"] == "instance-a"
    assert call(port, "GET", "/users/7").status == 404  # nothing stored


def test_name_of_exactly_100_characters_is_fine(port: int) -> None:
    assert call(port, "PUT", "/users/7", {"name": "x" * 100, "email": ""}).status == 200


@pytest.mark.parametrize("raw_id", ["abc", "0", "-1", "1.5", "+1", "1e3", str(2**63), "9" * 5000, "%31"])
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_user_id_must_be_a_positive_integer(port: int, method: str, raw_id: str) -> None:
    reply = call(port, method, f"/users/{raw_id}", CAROL if method == "PUT" else None)
    assert reply.status == 400
    assert "positive integer" in reply.json["message"]


def test_largest_sqlite_id_works(port: int) -> None:
    assert call(port, "PUT", f"/users/{2**63 - 1}", CAROL).status == 200
    assert call(port, "GET", f"/users/{2**63 - 1}").json["id"] == 2**63 - 1


def test_list_users_is_ordered_and_capped_at_100(port: int, db_path: Path) -> None:
    assert call(port, "GET", "/users").json == {
        "users": [ALICE, {"id": 2, "name": "bob", "email": "bob@example.com"}]
    }
    with sqlite3.connect(db_path) as db:  # behind the server's back: it is a shared file
        db.executemany("INSERT INTO users VALUES (?, ?, ?)", [(i, f"u{i}", "") for i in range(200, 80, -1)])
    users = call(port, "GET", "/users").json["users"]
    assert [u["id"] for u in users] == [1, 2, *range(81, 179)]


def test_health(port: int) -> None:
    reply = call(port, "GET", "/health")
    assert (reply.status, reply.json) == (200, {"status": "ok", "instance": "instance-a"})


def test_head_is_get_without_a_body(port: int) -> None:
    reply = call(port, "HEAD", "/health")
    assert reply.status == 200 and reply.json is None
    assert int(reply.headers["Content-Length"]) > 0


def test_query_string_is_ignored(port: int) -> None:
    assert call(port, "GET", "/users/1?verbose=1").json["name"] == "alice"


# --- Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/users/1/extra", "/users/", "/health/"])
def test_unknown_paths_are_404_json(port: int, path: str) -> None:
    reply = call(port, "GET", path)
    assert reply.status == 404 and "message" in reply.json
    assert reply.headers["X-Instance"] == "instance-a"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/users/1", "GET, HEAD, PUT"),
        ("POST", "/users/1", "GET, HEAD, PUT"),
        ("PUT", "/users", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(port: int, method: str, path: str, allow: str) -> None:
    reply = call(port, method, path, CAROL)
    assert reply.status == 405
    assert reply.headers["Allow"] == allow
    assert method in reply.json["message"]


def test_oversized_body_is_413_and_the_connection_survives(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        reply = send(conn, "PUT", "/users/7", b"x" * (MAX_BODY_BYTES + 1))
        assert reply.status == 413 and "larger than" in reply.json["message"]
        sock = conn.sock
        assert send(conn, "GET", "/users/1").status == 200
        assert conn.sock is sock  # the dropped body did not poison the connection
    finally:
        conn.close()


def test_body_of_exactly_the_limit_is_read(port: int) -> None:
    body = json.dumps(CAROL).encode().ljust(MAX_BODY_BYTES)  # JSON allows trailing spaces
    assert call(port, "PUT", "/users/7", body).status == 200


def test_huge_declared_body_is_413_without_reading_it(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/users/7")
        conn.putheader("Content-Length", str(100 * 1024 * 1024))
        conn.endheaders()  # and never send the body
        response = conn.getresponse()
        assert response.status == 413
        assert response.headers["Connection"] == "close"
        response.read()
    finally:
        conn.close()


def test_chunked_body_is_411(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("PUT", "/users/7", body=iter([json.dumps(CAROL).encode()]))  # sent chunked
        response = conn.getresponse()
        assert response.status == 411
        assert "Content-Length" in json.loads(response.read())["message"]
    finally:
        conn.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1_0", "99999999999999999999999"])
def test_invalid_content_length_is_400(port: int, value: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/users/7")
        conn.putheader("Content-Length", value)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 400
        assert json.loads(response.read()) == {"message": "invalid Content-Length"}
    finally:
        conn.close()


def test_unknown_method_is_501_json(port: int) -> None:
    reply = call(port, "BREW", "/users/1")
    assert reply.status == 501 and "BREW" in reply.json["message"]
    assert reply.headers["X-Instance"] == "instance-a"


def raw_exchange(sock: socket.socket, request: bytes) -> http.client.HTTPResponse:
    sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def test_unparsable_request_is_400_json_without_a_stale_request_id(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        first = raw_exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\n\r\n")
        assert first.status == 200 and first.headers["X-Request-Id"] == "first"
        first.read()
        second = raw_exchange(sock, b"NONSENSE\r\n\r\n")
        assert second.status == 400
        assert "message" in json.loads(second.read())
        assert second.headers["X-Instance"] == "instance-a"
        assert second.headers["X-Request-Id"] is None  # not the previous request's


# --- Headers and connections ----------------------------------------------------------------


def test_every_response_names_the_instance_and_echoes_the_request_id(port: int) -> None:
    for method, path in [("GET", "/users/1"), ("GET", "/users/404"), ("DELETE", "/health"), ("GET", "/x")]:
        reply = call(port, method, path, X_Request_Id="req-42")
        assert reply.headers["X-Instance"] == "instance-a"
        assert reply.headers["X-Request-Id"] == "req-42"
    assert call(port, "GET", "/users/1").headers["X-Request-Id"] is None


def test_keep_alive_serves_several_requests_on_one_connection(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        assert send(conn, "GET", "/users/1").status == 200
        sock = conn.sock
        assert sock is not None
        assert send(conn, "PUT", "/users/7", CAROL).status == 200
        assert send(conn, "GET", "/users/7").json["name"] == "carol"
        assert send(conn, "GET", "/users/404").status == 404  # errors keep the connection too
        assert send(conn, "GET", "/health").status == 200
        assert conn.sock is sock  # http.client would have reconnected had the server closed it
    finally:
        conn.close()


def test_two_instances_on_one_database_see_each_others_writes(db_path: Path) -> None:
    with running(db_path, "instance-a") as port_a, running(db_path, "instance-b") as port_b:
        conn_b = http.client.HTTPConnection("127.0.0.1", port_b, timeout=TIMEOUT)
        try:
            assert send(conn_b, "GET", "/users/7").status == 404
            assert call(port_a, "PUT", "/users/7", CAROL).headers["X-Instance"] == "instance-a"
            reply = send(conn_b, "GET", "/users/7")  # same kept-alive connection: no stale read
            assert reply.json == {"id": 7, **CAROL, "instance": "instance-b"}
            assert reply.headers["X-Instance"] == "instance-b"
        finally:
            conn_b.close()


def test_concurrent_writes_through_two_instances(db_path: Path) -> None:
    statuses: list[int] = []

    def writer(port: int, first_id: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            for user_id in range(first_id, first_id + 25):
                statuses.append(send(conn, "PUT", f"/users/{user_id}", CAROL).status)
        finally:
            conn.close()

    with running(db_path, "instance-a") as port_a, running(db_path, "instance-b") as port_b:
        threads = [
            threading.Thread(target=writer, args=(port, 100 + 25 * i))
            for i, port in enumerate([port_a, port_b] * 6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert statuses == [200] * 300
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM users").fetchone() == (302,)


# --- The command line -----------------------------------------------------------------------


@contextmanager
def cli(db_path: Path, name: str, *extra: str) -> Iterator["subprocess.Popen[bytes]"]:
    """Start the service as `tollway demo` does; kill it if the test did not stop it."""
    args = ["--host", "127.0.0.1", "--port", "0", "--db", str(db_path), "--name", name, *extra]
    command = [sys.executable, "-m", "tollway.examples.user_service", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def read_port(proc: "subprocess.Popen[bytes]") -> int:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready, "no 'listening on' line within 15 s"
    line = proc.stdout.readline().decode()
    match = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
    assert match, f"unexpected first line: {line!r}"
    return int(match[1])


def stop(proc: "subprocess.Popen[bytes]", signum: int) -> tuple[str, str, float]:
    """Send a signal; return the rest of stdout, stderr and how long the exit took."""
    started = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT)
    return out.decode(), err.decode(), time.monotonic() - started


def test_cli_serves_quietly_and_stops_on_sigterm(db_path: Path) -> None:
    with cli(db_path, "proc-a") as proc:
        port = read_port(proc)
        assert call(port, "GET", "/users/1").json == {**ALICE, "instance": "proc-a"}
        # An idle keep-alive connection, as a gateway's pool holds, must not delay the exit.
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            assert send(idle, "GET", "/health").status == 200
            out, err, took = stop(proc, signal.SIGTERM)
        finally:
            idle.close()
        assert proc.returncode == 0
        assert took < TIMEOUT
        assert (out, err) == ("", "")  # exactly one stdout line, and no request log by default


def test_cli_stops_on_ctrl_c_without_a_traceback(db_path: Path) -> None:
    with cli(db_path, "proc-a") as proc:
        read_port(proc)
        _out, err, _took = stop(proc, signal.SIGINT)
        assert proc.returncode == 0
        assert err == ""


def test_cli_verbose_logs_requests_to_stderr(db_path: Path) -> None:
    with cli(db_path, "proc-a", "--verbose") as proc:
        call(read_port(proc), "GET", "/users/2")
        out, err, _took = stop(proc, signal.SIGTERM)
        assert out == ""
        assert '"GET /users/2 HTTP/1.1" 200' in err


def test_two_cli_instances_starting_at_once_share_a_fresh_database(db_path: Path) -> None:
    with cli(db_path, "proc-a") as proc_a, cli(db_path, "proc-b") as proc_b:
        port_a, port_b = read_port(proc_a), read_port(proc_b)
        assert call(port_a, "PUT", "/users/7", CAROL).status == 200
        assert call(port_b, "GET", "/users/7").json == {"id": 7, **CAROL, "instance": "proc-b"}
        assert [u["id"] for u in call(port_b, "GET", "/users").json["users"]] == [1, 2, 7]  # seeded once
        for proc in (proc_a, proc_b):
            stop(proc, signal.SIGTERM)
            assert proc.returncode == 0


def test_cli_reports_an_unusable_database_and_exits_1(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tollway.examples.user_service", "--port", "0"]
    result = subprocess.run(
        [*command, "--db", str(tmp_path / "no-such-dir" / "users.db")],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("user_service: ")
