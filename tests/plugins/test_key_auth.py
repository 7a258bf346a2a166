"""key-auth: schema, handler (in-process) and integration (real gateway and backend)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
from pydantic import ValidationError

from tests.memory_transport import MemoryTransport
from tests.support import RawClient, gateway_config, request
from tollway.counters.metrics import REGISTRY
from tollway.plugins.builtin.key_auth import KeyAuthConfig, KeyCredential
from tollway.proxy.server import ClientConnection

CONSUMERS = [
    {"username": "alice", "id": "c-1", "credentials": {"key-auth": [{"key": "alice-key"}]}},
    {
        "username": "bob",
        "credentials": {"key-auth": [{"key_sha256": hashlib.sha256(b"bob-key").hexdigest()}]},
    },
    {"username": "guest"},
]


def config(**plugin_config):
    return {"plugins": [{"name": "key-auth", "config": plugin_config}], "consumers": CONSUMERS}


# -- schema ------------------------------------------------------------------------------------------------
def test_schema_defaults_and_limits():
    conf = KeyAuthConfig()
    assert conf.key_names == ["apikey"]
    assert conf.hide_credentials is True
    assert conf.key_in_query is False  # keys in URLs end up in logs
    with pytest.raises(ValidationError, match="not a valid header name"):
        KeyAuthConfig(key_names=["api key"])
    with pytest.raises(ValidationError, match="at least one of key_in_header, key_in_query or key_in_body"):
        KeyAuthConfig(key_in_header=False)
    with pytest.raises(ValidationError):
        KeyAuthConfig(key_names=[])


def test_credential_schema():
    assert KeyCredential(key="k1").identity() == hashlib.sha256(b"k1").hexdigest()
    assert KeyCredential(key_sha256="a" * 64).identity() == "a" * 64
    for bad in (
        {},
        {"key": "k", "key_sha256": "a" * 64},
        {"key": "has space"},
        {"key": "a\r\nb"},
        {"key_sha256": "XYZ"},
    ):
        with pytest.raises(ValidationError):
            KeyCredential(**bad)


# -- handler -----------------------------------------------------------------------------------------------
def test_valid_key_identifies_the_consumer(harness):
    gw = harness(config())
    result = gw.request("GET", "/x", {"apikey": "alice-key"})
    assert result.status == 200
    seen = result.upstream
    assert seen.header("x-consumer-id") == "c-1"
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("apikey") is None  # hidden from the backend by default
    assert seen.header("x-anonymous-consumer") is None


def test_hashed_keys_work(harness):
    result = harness(config()).request("GET", "/x", {"apikey": "bob-key"})
    assert result.status == 200
    assert result.upstream.header("x-consumer-username") == "bob"


def test_missing_and_invalid_keys_get_the_same_401(harness):
    gw = harness(config())
    missing = gw.request("GET", "/x")
    invalid = gw.request("GET", "/x", {"apikey": "alice-key-but-wrong"})
    for result in (missing, invalid):
        assert result.status == 401
        assert result.upstream is None
        assert result.header("www-authenticate") == 'Key realm="tollway"'
        assert result.header("content-type") == "application/json"
        assert result.json() == {
            "message": "missing or invalid credentials",
            "request_id": result.header("x-request-id"),
        }


def test_client_cannot_spoof_identity_headers(harness):
    gw = harness(config())
    headers = [
        ("apikey", "alice-key"),
        ("X-Consumer-Username", "admin"),
        ("x-consumer-id", "0"),
        ("X-Anonymous-Consumer", "false"),
        ("X-Consumer-Groups", "admins"),
    ]
    seen = gw.request("GET", "/x", headers).upstream
    assert seen.header_all("x-consumer-username") == ["alice"]
    assert seen.header_all("x-consumer-id") == ["c-1"]
    assert seen.header("x-anonymous-consumer") is None
    assert seen.header("x-consumer-groups") is None


def test_keep_credentials_when_asked(harness):
    seen = harness(config(hide_credentials=False)).request("GET", "/x", {"apikey": "alice-key"}).upstream
    assert seen.header("apikey") == "alice-key"


def test_key_names_are_tried_in_order(harness):
    gw = harness(config(key_names=["x-api-key", "apikey"]))
    assert gw.request("GET", "/", {"X-API-Key": "alice-key"}).status == 200
    assert gw.request("GET", "/", {"apikey": "bob-key"}).status == 200


def test_key_in_query_when_enabled_and_hidden(harness):
    off = harness(config())
    assert off.request("GET", "/x?apikey=alice-key").status == 401
    gw = harness(config(key_in_query=True))
    result = gw.request("GET", "/x?a=1&apikey=alice-key&b=two%20words")
    assert result.status == 200
    assert result.upstream.target == "/x?a=1&b=two%20words"
    kept = harness(config(key_in_query=True, hide_credentials=False)).request("GET", "/x?apikey=alice-key")
    assert kept.upstream.target == "/x?apikey=alice-key"


def test_anonymous_consumer_when_the_key_is_missing_or_wrong(harness):
    gw = harness(config(anonymous="guest"))
    for headers in ({}, {"apikey": "wrong"}):
        seen = gw.request("GET", "/x", headers).upstream
        assert seen.header("x-consumer-username") == "guest"
        assert seen.header("x-anonymous-consumer") == "true"
    seen = gw.request("GET", "/x", {"apikey": "alice-key"}).upstream
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("x-anonymous-consumer") is None


def test_10000_consumers_are_one_index(harness):
    consumers = [
        {"username": f"u{i}", "credentials": {"key-auth": [{"key": f"key-{i}"}]}} for i in range(10_000)
    ]
    routes = [
        {"name": f"r{i}", "service": "backend", "paths": [f"/r{i}/"], "plugins": [{"name": "key-auth"}]}
        for i in range(20)
    ]
    gw = harness({"routes": routes, "consumers": consumers})
    plugins = {id(r.pipeline.access[0].__self__) for r in gw.worker.snapshot.routes}
    assert len(plugins) == 20  # one instance (its compiled header lookup) per route's configuration...
    indexes = {id(r.pipeline.access[0].__self__.plain) for r in gw.worker.snapshot.routes}
    assert len(indexes) == 1  # ...sharing one key index
    assert (
        gw.request("GET", "/r7/x", {"apikey": "key-9999"}).upstream.header("x-consumer-username") == "u9999"
    )


# -- integration --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_key_auth_through_a_real_gateway(gateway, backend):
    be = backend()
    cfg = gateway_config(
        be.url,
        routes=[
            {"name": "open", "service": "backend", "paths": ["/public"]},
            {"name": "api", "service": "backend", "paths": ["/api"], "plugins": [{"name": "key-auth"}]},
        ],
    )
    cfg["consumers"] = CONSUMERS
    gw = gateway(cfg)
    assert request(gw.port, "GET", "/public/x").status == 200
    denied = request(gw.port, "GET", "/api/x", headers={"apikey": "nope"})
    assert denied.status == 401
    assert denied.header("www-authenticate") == 'Key realm="tollway"'
    ok = request(gw.port, "GET", "/api/x", headers={"apikey": "alice-key", "X-Consumer-Id": "forged"})
    assert ok.status == 200
    seen = be.seen[-1]
    assert seen.header_all("x-consumer-id") == ["c-1"]
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("apikey") is None
    assert len(be.seen) == 2  # the 401 never reached the backend


# -- ambiguity, header spellings, keys in bodies ------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/x?apikey=alice-key&apikey=bob-key", []),
        ("/x?apikey=alice-key&apikey=alice-key", []),  # even the same key twice: 401, not "first wins"
        ("/x", [("apikey", "alice-key"), ("apikey", "bob-key")]),
        ("/x", [("api-key", "alice-key"), ("API_KEY", "alice-key")]),  # "_" and "-": the same header
    ],
)
def test_a_key_name_sent_twice_is_ambiguous(harness, path, headers):
    gw = harness(config(key_names=["apikey", "api-key"], key_in_query=True))
    counted = REGISTRY.counter("auth_failures_total", plugin="key-auth", route="all", reason="ambiguous")
    before = counted.value
    result = gw.request("GET", path, headers)
    assert counted.value == before + 1
    assert result.status == 401
    assert result.upstream is None
    assert result.header("www-authenticate") == 'Key realm="tollway"'


def test_ambiguous_keys_fall_back_to_the_anonymous_consumer(harness):
    seen = harness(config(key_in_query=True, anonymous="guest")).request(
        "GET", "/x?apikey=alice-key&apikey=b"
    )
    assert seen.upstream.header("x-consumer-username") == "guest"


def test_header_names_treat_underscore_and_hyphen_alike(harness):
    gw = harness(config(key_names=["x_api_key"]))
    for name in ("X-Api-Key", "x_api_key", "X_API-KEY"):
        result = gw.request("GET", "/x", {name: "alice-key"})
        assert result.status == 200, name
        assert result.upstream.header(name) is None  # hidden whatever its spelling
    hyphen = harness(config(key_names=["x-api-key"]))
    assert hyphen.request("GET", "/x", {"X_Api_Key": "alice-key"}).status == 200
    # two names in order: the first one sent wins, the other is forwarded untouched
    both = harness(config(key_names=["x-api-key", "apikey"]))
    result = both.request("GET", "/x", [("apikey", "bob-key"), ("x_api_key", "alice-key")])
    assert result.upstream.header("x-consumer-username") == "alice"
    assert result.upstream.header("apikey") == "bob-key"


FORM = [("Content-Type", "application/x-www-form-urlencoded")]
JSON = [("Content-Type", "application/json")]


def test_schema_of_key_in_body():
    assert KeyAuthConfig(key_in_header=False, key_in_body=True).max_body_size == 65536
    assert KeyAuthConfig(key_in_body=True, max_body_size="1k").max_body_size == 1024


def test_key_in_a_form_body(harness):
    gw = harness(config(key_in_body=True))
    result = gw.request("POST", "/x", FORM, body=b"a=1&apikey=alice-key&b=two+words")
    assert result.status == 200
    assert result.upstream.header("x-consumer-username") == "alice"
    assert result.upstream.body == b"a=1&b=two+words"  # hidden from the backend
    assert result.upstream.header("content-length") == str(len(b"a=1&b=two+words"))
    assert gw.request("POST", "/x", FORM, body=b"apikey=alice-key&apikey=bob-key").status == 401
    assert gw.request("POST", "/x", FORM, body=b"apikey=wrong").status == 401
    kept = harness(config(key_in_body=True, hide_credentials=False))
    assert kept.request("POST", "/x", FORM, body=b"apikey=alice-key").upstream.body == b"apikey=alice-key"


def test_key_in_a_json_body(harness):
    gw = harness(config(key_in_body=True))
    result = gw.request("POST", "/x", JSON, body=b'{"apikey": "bob-key", "n": 1}')
    assert result.status == 200
    assert result.upstream.header("x-consumer-username") == "bob"
    assert result.upstream.json() == {"n": 1}
    for body in (b'["apikey"]', b"{not json", b'{"apikey": 5}'):
        assert gw.request("POST", "/x", JSON, body=body).status == 401


def test_bodies_not_searched_for_a_key(harness):
    gw = harness(config(key_in_body=True, max_body_size=32))
    big = b"apikey=alice-key&pad=" + b"x" * 64
    assert gw.request("POST", "/x", FORM, body=big).status == 401  # over max_body_size: not read
    text = [("Content-Type", "text/plain")]
    assert gw.request("POST", "/x", text, body=b"apikey=alice-key").status == 401
    chunked = [*FORM, ("Transfer-Encoding", "chunked")]
    assert gw.request("POST", "/x", chunked, body=b"10\r\napikey=alice-key\r\n0\r\n\r\n").status == 401
    # a header key still works, and the body then is not read at all
    result = gw.request("POST", "/x", [*FORM, ("apikey", "alice-key")], body=big)
    assert result.status == 200 and result.upstream.body == big


def test_a_client_leaving_while_its_body_is_awaited(harness):
    gw = harness(config(key_in_body=True))
    client = ClientConnection(gw.worker)
    client.connection_made(MemoryTransport(("127.0.0.1", 50001)))  # type: ignore[arg-type]
    head = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    gw.loop.call_soon(client.data_received, head + b"Content-Length: 100\r\n\r\napikey=ali")
    gw._run_until(lambda: False, 0.05)
    waiting = [task for task in asyncio.all_tasks(gw.loop) if not task.done()]
    assert waiting  # the hook waits for the rest of the body
    client.connection_lost(None)
    assert gw._run_until(lambda: all(task.done() for task in waiting), 2.0)  # nothing left hanging
    assert gw.logged == []


@pytest.mark.integration
def test_key_in_body_through_a_real_gateway(gateway, backend):
    be = backend()
    cfg = gateway_config(
        be.url,
        routes=[
            {
                "name": "api",
                "service": "backend",
                "paths": ["/api"],
                "plugins": [{"name": "key-auth", "config": {"key_in_body": True, "key_in_query": True}}],
            }
        ],
    )
    cfg["consumers"] = CONSUMERS
    gw = gateway(cfg)
    # the body arrives after the head, in two pieces, with Expect: 100-continue
    client = RawClient(gw.port)
    body = b"apikey=alice-key&order=42"
    client.send(
        b"POST /api/orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    assert client.read_response().status == 100
    client.send(body[:10])
    time.sleep(0.05)
    client.send(body[10:])
    result = client.read_response()
    client.close()
    assert result.status == 200
    seen = be.seen[-1]
    assert seen.body == b"order=42"
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("content-length") == "8"
    assert request(gw.port, "POST", "/api/x?apikey=alice-key&apikey=bob-key").status == 401
    json_body = b'{"apikey": "bob-key", "item": "x"}'
    ok = request(gw.port, "POST", "/api/x", {"Content-Type": "application/json"}, json_body)
    assert ok.status == 200
    assert be.seen[-1].header("x-consumer-username") == "bob"
    assert json.loads(be.seen[-1].body) == {"item": "x"}
    assert len(be.seen) == 2  # the ambiguous request never reached the backend
