"""key-auth: schema, handler (in-process) and integration (real gateway and backend)."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from tests.support import gateway_config, request
from tollway.plugins.builtin.key_auth import KeyAuthConfig, KeyCredential

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
    with pytest.raises(ValidationError, match="at least one of key_in_header or key_in_query"):
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
    assert len(plugins) == 20  # one instance per route's configuration...
    indexes = {id(r.pipeline.access[0].__self__._plain) for r in gw.worker.snapshot.routes}
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
