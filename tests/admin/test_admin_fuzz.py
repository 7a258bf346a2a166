"""Client input never makes the admin API answer 5xx: hundreds of malformed requests by hand, then
thousands generated from the API's own OpenAPI document (schemathesis), whose answers must also match
the documented schema."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.admin.support import AdminClient, start_admin_node
from tests.support import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Gateway, AdminClient]]:
    gw, admin = start_admin_node(tmp_path / "node.yaml", {"backend": "sqlite", "path": "tollway.db"})
    try:
        yield gw, admin
    finally:
        gw.stop()


def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, half-close, read what comes back (b"" if the server just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "BREW", "get", "G\x01T"]
_PATHS = [
    "/",
    "/routes",
    "/routes/x",
    "/services/a/routes/b",
    "/upstreams/u/targets/t:1",
    "/consumers/c/credentials",
    "/consumers/c/credentials/key-auth/0",
    "/consumers/c/credentials/key-auth/99999999999999999999",
    "/plugins/a@route=b",
    "/config?dry_run=maybe",
    "/config?prune=1&dry_run=1",
    "/audit?since=nan&size=5",
    "/audit?offset=-1",
    "/routes?size=100000",
    "/routes?offset=1e9",
    "/%ff%fe",
    "/routes/%00",
    "/a/b/c/d/e/f/g",
    "/routes/" + "x" * 5000,
    "//",
    "/routes?tags=,,,",
    "/services/%2e%2e/routes",
    "/cluster",
    "/openapi.json",
]
_BODIES: list[Any] = [
    None,
    {},
    [],
    "text",
    1,
    1e308,
    True,
    {"name": None},
    {"name": 5},
    {"name": "x" * 300},
    {"name": ""},
    {"name": "a", "service": ["list"]},
    {"name": "a", "paths": "/notalist"},
    {"name": "a", "plugins": "x"},
    {"name": "a", "plugins": [{"name": 1}]},
    {"username": {"nested": True}},
    {"targets": [None]},
    {"target": 7},
    {"name": "\u0000\udfff"},
    {"services": "x"},
    {"services": [1, 2]},
    {"routes": [{}]},
    {"name": "n", "url": "http://[::1"},
    {"name": "n", "credentials": {"key-auth": "no"}},
]


def _malformed(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    method, path = rng.choice(_METHODS), rng.choice(_PATHS)
    if kind == 0:  # random bytes where a request should be
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    if kind == 1:  # a broken head
        return rng.choice(
            [
                b"GET\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                b"\r\n\r\n\r\n",
                b"POST /routes HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzz",
                b"POST /routes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
            ]
        )
    body = rng.choice(_BODIES)
    raw = b"" if body is None else json.dumps(body).encode("utf-8", "surrogatepass")
    if kind == 2:  # truncated or corrupted JSON
        raw = raw[: rng.randrange(len(raw) + 1)] + rng.choice([b"", b"\xff", b"{", b"]"])
    headers = {"Host": "a", "Content-Length": str(len(raw))}
    if kind == 3:
        headers[rng.choice(["If-Match", "If-None-Match", "Authorization", "Content-Type"])] = rng.choice(
            ["*", '"x"', 'W/"1"', "Bearer", "garbage", '"99999999999999999999999"', "application/yaml"]
        )
    if kind == 4:
        raw = b"services: [ {name: a, url: 'http://127.0.0.1:9'} ]\n" if rng.random() < 0.5 else b"\t: :\n- ["
        headers.update({"Content-Type": "application/yaml", "Content-Length": str(len(raw))})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1", "replace") + raw


def test_hundreds_of_malformed_requests_never_get_a_5xx(node: tuple[Gateway, AdminClient]) -> None:
    gw, admin = node
    rng = random.Random(1401)
    statuses: dict[int, int] = {}
    for _ in range(400):
        answer = _exchange(admin.port, _malformed(rng))
        for line in answer.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 "):
                status = int(line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
                assert status < 500, answer[:2000]
    assert statuses.get(400, 0) > 50 and sum(statuses.values()) > 300  # the requests were answered
    # deeply nested bodies (orjson accepts 1,024 levels; the recursive steps behind must not see them)
    admin.post("/services", {"name": "a", "url": "http://127.0.0.1:9"})
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    for yaml_body in ("[" * 5000 + "]" * 5000, laughs):
        answer = admin.post("/config", raw=yaml_body.encode(), headers={"Content-Type": "application/yaml"})
        assert answer.status == 400, answer.raw
    for depth in (65, 900, 1020):
        deep_config = '{"a":' * depth + "1" + "}" * depth
        plugin = f'{{"name":"a","url":"http://127.0.0.1:9","plugins":[{{"name":"key-auth","config":{deep_config}}}]}}'
        tags = '{"name":"a","tags":' + "[" * depth + "]" * depth + "}"
        for method, path, body in (
            ("POST", "/services", plugin),
            ("POST", "/config?dry_run=true", '{"services":[' + plugin + "]}"),
            ("PUT", "/services/a", tags),
            ("PATCH", "/services/a", tags),
        ):
            answer = admin.call(method, path, raw=body.encode())
            message = answer.body["message"]
            assert answer.status == 400 and ("nested" in message or "depth" in message), (depth, path)
    assert admin.get("/").status == 200  # and the listener is still up
    assert not [line for line in gw.errors if "Traceback" in line or "failed (request" in line]


# ~3,000 generated requests, each write stored and propagated to the node: ~100-120 s on a quiet 2-core
# machine, at the suite's 120 s per-test timeout (meant for ordinary tests), and over it on a busy one.
@pytest.mark.timeout(360)
def test_schemathesis_from_the_openapi_document(node: tuple[Gateway, AdminClient]) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi import checks as conformance

    # what the document promises: documented statuses, content types, headers, body schemas
    checks = [
        conformance.status_code_conformance,
        conformance.content_type_conformance,
        conformance.response_headers_conformance,
        conformance.response_schema_conformance,
    ]

    gw, admin = node
    base_url = f"http://127.0.0.1:{admin.port}"
    # some entities to hit, so generated names sometimes exist
    admin.post("/upstreams", {"name": "u", "targets": [{"target": "127.0.0.1:9"}]})
    admin.post("/services", {"name": "s", "upstream": "u"})
    admin.post("/routes", {"name": "r", "service": "s", "paths": ["/r"]})
    admin.post("/consumers", {"username": "c", "credentials": {"key-auth": [{"key": "k-123456"}]}})
    schema = schemathesis.openapi.from_dict(admin.get("/openapi.json").body)
    operations = [result.ok() for result in schema.get_all_operations()]
    per_operation = 3000 // len(operations) // 2 + 1
    sent = {"requests": 0}
    problems: list[str] = []

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=per_operation,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call(base_url=base_url, timeout=15)
                sent["requests"] += 1
                if response.status_code >= 500:
                    problems.append(
                        f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
                    )
                    return
                try:
                    case.validate_response(response, checks=checks)
                except (Exception, BaseExceptionGroup) as exc:  # checks' failures: reported together
                    problems.append(f"{case.method} {case.formatted_path}: {exc}"[:1000])

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters): nothing to send
                assert mode == GenerationMode.NEGATIVE
    assert sent["requests"] >= 2000
    assert problems == [], f"{len(problems)} problems:\n" + "\n".join(problems[:20] + gw.errors[-60:])
    assert not [line for line in gw.errors if "Traceback" in line]
