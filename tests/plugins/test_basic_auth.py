"""basic-auth: hashes only, constant-time checks off the event loop, a cache that never caches failure."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from functools import cache

import bcrypt
import pytest
from pydantic import ValidationError

from tests.memory_transport import MemoryTransport
from tests.support import ROOT, gateway_config, request
from tollway.plugins.builtin.basic_auth import BasicAuthConfig, BasicCredential
from tollway.plugins.builtin.passwords import check_hash, hash_password, verifier
from tollway.proxy.server import ClientConnection


@cache
def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()  # the lowest accepted cost


@cache
def pbkdf2_hash(password: str) -> str:
    import hashlib
    import os

    from tollway.plugins.builtin.passwords import _ab64_encode

    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000)
    return f"$pbkdf2-sha256$100000${_ab64_encode(salt)}${_ab64_encode(digest)}"


@cache
def argon2_hash(password: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=19456).hash(password)


def consumers():
    return [
        {
            "username": "alice",
            "credentials": {"basic-auth": [{"username": "alice", "password_hash": bcrypt_hash("s3cret")}]},
        },
        {
            "username": "bob",
            "credentials": {
                "basic-auth": [{"username": "bob@x", "password_hash": pbkdf2_hash("pw:with:colons")}]
            },
        },
        {
            "username": "carol",
            "credentials": {"basic-auth": [{"username": "carol", "password_hash": argon2_hash("ärger")}]},
        },
        {"username": "guest"},
    ]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def config(**plugin_config):
    return {"plugins": [{"name": "basic-auth", "config": plugin_config}], "consumers": consumers()}


def plugin_of(gw):
    return gw.worker.snapshot.routes[0].pipeline.access[0].__self__


def count_checks(plugin) -> list[str]:
    calls: list[str] = []
    for name, user in plugin._users.items():
        original = user.verify

        def counted(password, original=original, name=name):
            calls.append(name)
            return original(password)

        user.verify = counted
    dummy = plugin._dummy

    def counted_dummy(password):
        calls.append("<dummy>")
        return dummy(password)

    plugin._dummy = counted_dummy
    return calls


# -- schema and hashes ---------------------------------------------------------------------------------------
def test_plaintext_passwords_are_refused_with_a_hint():
    with pytest.raises(ValidationError, match=r"plaintext passwords are not accepted.*tollway hash-password"):
        BasicCredential.model_validate({"username": "a", "password": "x"})


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode(), "bcrypt cost 04 is too low"),
        ("$pbkdf2-sha256$1000$c2FsdA$aGFzaA", "too few"),
        ("5f4dcc3b5aa765d61d8327deb882cf99", "not a supported password hash"),  # a bare MD5
        ("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g", "too weak"),
    ],
    ids=["bcrypt-cost-4", "pbkdf2-few-rounds", "bare-md5", "argon2-weak"],  # the same on every xdist worker
)
def test_weak_or_unknown_hashes_are_refused(stored, message):
    with pytest.raises(ValueError, match=message):
        check_hash(stored)


def test_schema():
    assert BasicAuthConfig().cache_ttl == 60
    with pytest.raises(ValidationError):
        BasicCredential(username="a:b", password_hash=bcrypt_hash("x"))
    with pytest.raises(ValidationError):
        BasicAuthConfig(realm='a"b')


@pytest.mark.parametrize("scheme", ["bcrypt", "pbkdf2-sha256", "argon2"])
def test_hash_password_round_trip(scheme):
    stored = check_hash(hash_password("correct horse", scheme))
    check = verifier(stored)
    assert check(b"correct horse")
    assert not check(b"correct horsE")


def test_hash_password_cli():
    out = subprocess.run(
        [sys.executable, "-m", "tollway", "hash-password", "--stdin", "--scheme", "pbkdf2-sha256"],
        input="from the cli\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert out.startswith("$pbkdf2-sha256$600000$")
    assert verifier(check_hash(out))(b"from the cli")


# -- handler ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user", "password", "consumer"),
    [("alice", "s3cret", "alice"), ("bob@x", "pw:with:colons", "bob"), ("carol", "ärger", "carol")],
)
def test_valid_credentials(harness, user, password, consumer):
    result = harness(config()).request("GET", "/", basic(user, password))
    assert result.status == 200
    assert result.upstream.header("x-consumer-username") == consumer
    assert result.upstream.header("authorization") is None  # hidden by default


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("alice", "wrong"),
        basic("nobody", "s3cret"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"Authorization": "Bearer abc"},
    ],
)
def test_every_failure_is_the_same_401(harness, headers):
    result = harness(config()).request("GET", "/", headers)
    assert result.status == 401
    assert result.header("www-authenticate") == 'Basic realm="tollway"'
    assert result.json()["message"] == "missing or invalid credentials"
    assert result.upstream is None


def test_successes_are_cached_failures_are_not(harness):
    gw = harness(config())
    calls = count_checks(plugin_of(gw))
    for _ in range(3):
        assert gw.request("GET", "/", basic("alice", "s3cret")).status == 200
    assert calls == ["alice"]
    for _ in range(2):
        assert gw.request("GET", "/", basic("alice", "S3cret")).status == 401
    assert calls == ["alice", "alice", "alice"]
    assert gw.request("GET", "/", basic("alice", "s3cret")).status == 200
    assert calls == ["alice", "alice", "alice"]  # still cached


def test_unknown_users_cost_a_real_check(harness):
    gw = harness(config())
    calls = count_checks(plugin_of(gw))
    assert gw.request("GET", "/", basic("mallory", "s3cret")).status == 401
    assert calls == ["<dummy>"]


def test_cache_entries_expire(harness):
    gw = harness(config(cache_ttl=0.05))
    calls = count_checks(plugin_of(gw))
    assert gw.request("GET", "/", basic("alice", "s3cret")).status == 200
    time.sleep(0.06)
    assert gw.request("GET", "/", basic("alice", "s3cret")).status == 200
    assert calls == ["alice", "alice"]


def concurrent(gw, header_sets):
    """Feed several requests at once, on their own connections, and run until all are answered."""
    transports = []
    for headers in header_sets:
        client = ClientConnection(gw.worker)
        transport = MemoryTransport(("127.0.0.1", 50000))
        client.connection_made(transport)
        lines = ["GET / HTTP/1.1", "Host: t", *[f"{k}: {v}" for k, v in headers.items()]]
        gw.loop.call_soon(client.data_received, ("\r\n".join(lines) + "\r\n\r\n").encode())
        transports.append(transport)
    gw._run_until(lambda: all(b"\r\n\r\n" in t.data for t in transports), 10)
    return [int(bytes(t.data).split(b" ")[1]) for t in transports]


def test_identical_concurrent_credentials_share_one_check(harness):
    gw = harness(config())
    calls = count_checks(plugin_of(gw))
    concurrent(gw, [basic("alice", "s3cret")] * 5)
    assert calls == ["alice"]


def test_too_many_pending_checks_get_503(harness):
    gw = harness(config(max_pending_checks=1))
    statuses = concurrent(gw, [basic("alice", "s3cret"), basic("alice", "other")])
    assert 503 in statuses


def test_or_with_key_auth_through_anonymous(harness):
    gw = harness(
        {
            "plugins": [
                {"name": "key-auth", "config": {"anonymous": "guest"}},
                {"name": "basic-auth", "config": {"anonymous": "guest"}},
            ],
            "consumers": [
                *consumers(),
                {"username": "kim", "credentials": {"key-auth": [{"key": "kim-key"}]}},
            ],
        }
    )
    by_key = gw.request("GET", "/", {"apikey": "kim-key", **basic("alice", "wrong")}).upstream
    assert by_key.header("x-consumer-username") == "kim"
    by_password = gw.request("GET", "/", basic("alice", "s3cret")).upstream
    assert by_password.header("x-consumer-username") == "alice"
    assert by_password.header("x-anonymous-consumer") is None
    neither = gw.request("GET", "/", basic("alice", "wrong")).upstream
    assert neither.header_all("x-consumer-username") == ["guest"]
    assert neither.header("x-anonymous-consumer") == "true"


# -- integration ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_basic_auth_through_a_real_gateway(gateway, backend):
    be = backend()
    cfg = gateway_config(be.url)
    cfg["plugins"] = [{"name": "basic-auth", "config": {"realm": "users"}}]
    cfg["consumers"] = consumers()
    gw = gateway(cfg)
    denied = request(gw.port, "GET", "/x", headers=basic("alice", "nope"))
    assert denied.status == 401
    assert denied.header("www-authenticate") == 'Basic realm="users"'
    for _ in range(2):
        ok = request(gw.port, "GET", "/x", headers=basic("alice", "s3cret"))
        assert ok.status == 200
    assert be.seen[-1].header("x-consumer-username") == "alice"
    assert be.seen[-1].header("authorization") is None
