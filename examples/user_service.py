"""A small user service: the example backend that `tollway demo` puts behind the gateway.

Users live in one SQLite file that every instance shares, so two instances behind the gateway
serve the same data and the demo can show requests spreading over both. Standard library only.

Run it:

    python -m tollway.examples.user_service --port 8001 --db users.db --name instance-a

With ``--port 0`` it picks a free port. Either way it prints one line, ``listening on
http://HOST:PORT``, once it accepts connections, and stops cleanly on SIGTERM or Ctrl-C.

Endpoints (all JSON; errors are ``{"message": ...}``):

    GET  /users/{id}   the user, or 404
    PUT  /users/{id}   create or replace from {"name": str (1-100 chars), "email": str}
    GET  /users        {"users": [...]}: the first 100 users by id
    GET  /health       {"status": "ok", "instance": ...}: for the gateway's health checks

Every response carries ``X-Instance`` (which instance answered) and echoes ``X-Request-Id``.
It speaks HTTP/1.1 with keep-alive, so the gateway's connection pool can reuse connections.
"""

import argparse
import json
import re
import signal
import sqlite3
import sys
import threading
import time
import traceback
from contextlib import closing
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 64 * 1024
# An oversized body up to this size is read and dropped, so the client (often a gateway still
# writing it) gets our 413 rather than a connection reset. Anything bigger: we just hang up.
DRAIN_LIMIT_BYTES = 1024 * 1024
LIST_LIMIT = 100
MAX_USER_ID = 2**63 - 1  # the largest INTEGER SQLite stores
SEED_USERS = [(1, "alice", "alice@example.com"), (2, "bob", "bob@example.com")]
USER_PATH = re.compile(r"/users/([^/]+)")


# --- Storage -------------------------------------------------------------------------------


def connect(db_path: str) -> sqlite3.Connection:
    # timeout= is SQLite's busy timeout: wait up to 5 s for another instance's write to finish.
    db = sqlite3.connect(db_path, timeout=5.0)
    db.row_factory = sqlite3.Row
    # With WAL, NORMAL is still crash-safe and saves an fsync on every write.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def init_db(db_path: str) -> None:
    """Create the table and seed alice and bob; safe when several instances start at once."""
    with closing(connect(db_path)) as db:
        # WAL lets readers and a writer in another process work at the same time. Switching to
        # it does not wait out the busy timeout, so retry while an instance starting at the same
        # moment holds the file.
        for attempt in range(50):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        with db:  # one transaction: commit at the end
            db.execute(
                "CREATE TABLE IF NOT EXISTS users"
                " (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)"
            )
            db.executemany("INSERT OR IGNORE INTO users (id, name, email) VALUES (?, ?, ?)", SEED_USERS)


def get_user(db: sqlite3.Connection, user_id: int) -> dict[str, Any] | None:
    row = db.execute("SELECT id, name, email FROM users WHERE id = ?", (user_id,)).fetchone()
    return dict(row) if row else None


def list_users(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = db.execute("SELECT id, name, email FROM users ORDER BY id LIMIT ?", (LIST_LIMIT,)).fetchall()
    return [dict(row) for row in rows]


def put_user(db: sqlite3.Connection, user_id: int, name: str, email: str) -> dict[str, Any]:
    with db:  # commit
        db.execute("INSERT OR REPLACE INTO users (id, name, email) VALUES (?, ?, ?)", (user_id, name, email))
    return {"id": user_id, "name": name, "email": email}


# --- Validation ----------------------------------------------------------------------------


class HTTPError(Exception):
    """Raised by request handling to answer with an error status and ``{"message": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def parse_user_id(raw: str) -> int:
    # isascii(): str.isdigit() also accepts digits like "²" that int() rejects. The length
    # check keeps int() off huge strings: SQLite integers have at most 19 digits.
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and 0 < int(raw) <= MAX_USER_ID:
        return int(raw)
    raise HTTPError(400, f"user id must be a positive integer, got {raw[:40]!r}")


def parse_user_body(body: bytes) -> tuple[str, str]:
    """Return (name, email) from a PUT body. Any Content-Type is fine as long as it is JSON."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, 'body must be a JSON object like {"name": "...", "email": "..."}')
    for field in ("name", "email"):
        if field not in data:
            raise HTTPError(400, f'missing field "{field}"')
        if not isinstance(data[field], str):
            raise HTTPError(400, f'"{field}" must be a string')
        try:
            data[field].encode("utf-8")  # JSON allows lone surrogates ("\ud800"); SQLite does not
        except UnicodeEncodeError:
            raise HTTPError(400, f'"{field}" is not valid Unicode text') from None
    if not 1 <= len(data["name"]) <= 100:
        raise HTTPError(400, '"name" must be 1 to 100 characters long')
    return data["name"], data["email"]


# --- HTTP ----------------------------------------------------------------------------------


class UserHandler(BaseHTTPRequestHandler):
    """Serves one client connection, one request after another, in its own thread."""

    protocol_version = "HTTP/1.1"  # keep-alive: the connection stays open between requests
    # http.server's default, HTTP/0.9, would answer a garbled request line with a bare body.
    default_request_version = "HTTP/1.0"
    server_version = "tollway-user-service"
    timeout = 30  # seconds; drop connections that sit idle or stall mid-request
    # Headers and body go out in two writes; with Nagle's algorithm on, the second would wait
    # for the client's delayed ACK, adding ~40 ms to every response on a kept-alive connection.
    disable_nagle_algorithm = True
    server: "UserServer"

    def setup(self) -> None:
        super().setup()
        # One SQLite connection per client connection, so per thread (sqlite3 connections must
        # not be shared between threads), reused by every request a gateway sends on it.
        self.db = connect(self.server.db_path)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.db.close()

    def _dispatch(self) -> None:
        headers: dict[str, str] = {}
        try:
            status, payload = self._handle()
        except HTTPError as exc:
            status, payload, headers = exc.status, {"message": exc.message}, exc.headers
        except OSError:
            raise  # the client timed out or hung up: no one to answer; http.server drops it
        except Exception:
            traceback.print_exc()  # always shown, --verbose or not: a 500 is a bug
            status, payload = 500, {"message": "internal server error"}
        self._send_json(status, payload, headers)

    # Every method goes through one router, which answers 404 for an unknown path and 405 for
    # a method the path does not take; http.server answers 501 for methods not listed here.
    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _handle(self) -> tuple[int, dict[str, Any]]:
        """Route the request; return (status, JSON payload) or raise HTTPError."""
        # Read the body first, whatever the route: on a keep-alive connection, an unread body
        # would be taken for the start of the next request.
        body = self._read_body()
        path = self.path.partition("?")[0]
        if path == "/health":
            self._allow(path, "GET", "HEAD")
            return 200, {"status": "ok", "instance": self.server.instance}
        if path == "/users":
            self._allow(path, "GET", "HEAD")
            return 200, {"users": list_users(self.db)}
        match = USER_PATH.fullmatch(path)
        if match is None:
            raise HTTPError(404, f"no such endpoint: {path}")
        self._allow(path, "GET", "HEAD", "PUT")
        user_id = parse_user_id(match[1])
        if self.command == "PUT":
            name, email = parse_user_body(body)
            user = put_user(self.db, user_id, name, email)
        else:
            found = get_user(self.db, user_id)
            if found is None:
                raise HTTPError(404, f"user {user_id} not found")
            user = found
        return 200, {**user, "instance": self.server.instance}

    def _allow(self, path: str, *methods: str) -> None:
        if self.command not in methods:
            allow = ", ".join(methods)
            raise HTTPError(405, f"{self.command} not allowed on {path}", {"Allow": allow})

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            # RFC 9112 lets a server require Content-Length; that keeps this reader simple.
            raise HTTPError(411, "send the body with a Content-Length", {"Connection": "close"})
        lengths = set(self.headers.get_all("Content-Length", []))
        if not lengths:
            return b""
        raw = lengths.pop().strip()
        # Without one sane length we cannot tell where the next request starts: hang up.
        if lengths or not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise HTTPError(400, "invalid Content-Length", {"Connection": "close"})
        length = int(raw)
        if length > MAX_BODY_BYTES:
            message = f"body is larger than {MAX_BODY_BYTES} bytes"
            if length > DRAIN_LIMIT_BYTES:
                raise HTTPError(413, message, {"Connection": "close"})
            while length > 0 and (chunk := self.rfile.read(min(length, 65536))):
                length -= len(chunk)
            raise HTTPError(413, message)
        return self.rfile.read(length)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))  # always: keep-alive needs framing
        self.send_header("X-Instance", self.server.instance)
        request_id = self.headers.get("X-Request-Id")
        if request_id and request_id.isprintable() and len(request_id) <= 200:  # no header injection
            self.send_header("X-Request-Id", request_id)
        for name, value in headers.items():
            self.send_header(name, value)  # "Connection: close" also ends the keep-alive loop
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # --- Overrides of http.server's own behaviour ---

    def handle_one_request(self) -> None:
        # Forget the previous request on this connection first, so an error for a request that
        # could not be parsed does not echo the previous request's X-Request-Id.
        self.headers = HTTPMessage()
        super().handle_one_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server calls this for requests it cannot parse or methods it does not know:
        # answer in JSON like everything else, then hang up, as http.server does.
        self.log_error("code %d, message %s", code, message)
        self._send_json(code, {"message": message or HTTPStatus(code).phrase}, {"Connection": "close"})

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:  # quiet by default; --verbose logs each request to stderr
            super().log_message(format, *args)


class UserServer(ThreadingHTTPServer):
    """A thread per connection; knows the database, its instance name and verbosity."""

    # Don't wait for connection threads on close: idle keep-alive connections from a gateway's
    # pool would hold up shutdown for up to UserHandler.timeout seconds.
    block_on_close = False

    def __init__(self, address: tuple[str, int], db_path: str, instance: str, verbose: bool) -> None:
        self.db_path, self.instance, self.verbose = db_path, instance, verbose
        super().__init__(address, UserHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is routine behind a gateway; anything else is a bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def make_server(host: str, port: int, db_path: str, name: str, *, verbose: bool = False) -> UserServer:
    """Set up the database and return a server already listening; call serve_forever() next."""
    init_db(db_path)
    return UserServer((host, port), db_path, name, verbose)


# --- Command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The example user service behind `tollway demo`.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (default: 8001)")
    parser.add_argument("--db", default="users.db", help="SQLite file shared by all instances")
    parser.add_argument("--name", default="user-service", help="instance name sent in X-Instance")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)

    try:
        server = make_server(args.host, args.port, args.db, args.name, verbose=args.verbose)
    except (OSError, sqlite3.Error) as exc:  # port taken, database directory missing, ...
        print(f"user_service: {exc}", file=sys.stderr)
        return 1
    # serve_forever() runs in this main thread, and shutdown() waits for it to return, so
    # SIGTERM asks for the shutdown from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    host, port = server.server_address[:2]
    assert isinstance(host, str)  # an AF_INET server: the address is text
    try:
        print(f"listening on http://{host}:{port}", flush=True)  # the parent process reads the port
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C: stop as for SIGTERM
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
