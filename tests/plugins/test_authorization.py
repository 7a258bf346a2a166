"""acl and ip-restriction: schema, handler, integration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.support import gateway_config, request
from tollway.plugins.builtin.acl import AclConfig
from tollway.plugins.builtin.ip_restriction import IpRestrictionConfig
from tollway.plugins.builtin.netutil import IpSet, parse_ip

CONSUMERS = [
    {"username": "ann", "groups": ["admins", "staff"], "credentials": {"key-auth": [{"key": "ann-key"}]}},
    {"username": "sam", "groups": ["staff"], "credentials": {"key-auth": [{"key": "sam-key"}]}},
    {"username": "eve", "credentials": {"key-auth": [{"key": "eve-key"}]}},
    {"username": "guest", "groups": ["public"]},
]


def acl_config(acl: dict, **key_auth) -> dict:
    return {
        "plugins": [{"name": "key-auth", "config": key_auth}, {"name": "acl", "config": acl}],
        "consumers": CONSUMERS,
    }


# -- acl ----------------------------------------------------------------------------------------------------
def test_acl_schema():
    with pytest.raises(ValidationError, match="exactly one of"):
        AclConfig()
    with pytest.raises(ValidationError, match="exactly one of"):
        AclConfig(allow=["a"], deny=["b"])


@pytest.mark.parametrize(("key", "status"), [("ann-key", 200), ("sam-key", 403), ("eve-key", 403)])
def test_acl_allow(harness, key, status):
    result = harness(acl_config({"allow": ["admins"]})).request("GET", "/", {"apikey": key})
    assert result.status == status
    if status == 403:
        assert result.json() == {"message": "forbidden", "request_id": result.header("x-request-id")}
        assert result.upstream is None


@pytest.mark.parametrize(("key", "status"), [("ann-key", 403), ("sam-key", 200), ("eve-key", 200)])
def test_acl_deny(harness, key, status):
    assert harness(acl_config({"deny": ["admins"]})).request("GET", "/", {"apikey": key}).status == status


def test_acl_rejection_status_and_message(harness):
    gw = harness(acl_config({"allow": ["admins"], "status": 404, "message": "no such thing"}))
    result = gw.request("GET", "/", {"apikey": "sam-key"})
    assert result.status == 404
    assert result.json() == {"message": "no such thing", "request_id": result.header("x-request-id")}
    assert result.upstream is None
    assert gw.request("GET", "/", {"apikey": "ann-key"}).status == 200
    with pytest.raises(ValidationError):
        AclConfig(allow=["a"], status=302)


def test_acl_forwards_groups_unless_hidden(harness):
    seen = (
        harness(acl_config({"allow": ["staff"]}))
        .request("GET", "/", {"apikey": "ann-key", "X-Consumer-Groups": "root"})
        .upstream
    )
    assert seen.header_all("x-consumer-groups") == ["admins, staff"]
    hidden = (
        harness(acl_config({"allow": ["staff"], "hide_groups_header": True}))
        .request("GET", "/", {"apikey": "ann-key", "X-Consumer-Groups": "root"})
        .upstream
    )
    assert hidden.header("x-consumer-groups") is None


def test_acl_without_a_consumer_is_401_and_anonymous_counts(harness):
    no_auth = harness({"plugins": [{"name": "acl", "config": {"allow": ["staff"]}}]})
    assert no_auth.request("GET", "/").status == 401
    gw = harness(acl_config({"allow": ["public", "staff"]}, anonymous="guest"))
    assert gw.request("GET", "/").status == 200  # guest is in "public"
    assert gw.request("GET", "/", {"apikey": "eve-key"}).status == 403


# -- ip-restriction -----------------------------------------------------------------------------------------
def test_ip_restriction_schema():
    with pytest.raises(ValidationError, match="at least one of"):
        IpRestrictionConfig()
    with pytest.raises(ValidationError, match="not an IP address or CIDR"):
        IpRestrictionConfig(allow=["10.0.0.0/33"])


def test_ip_sets():
    s = IpSet(["10.0.0.0/8", "10.1.0.0/16", "192.168.1.7", "2001:db8::/32", "::ffff:172.16.0.0/108"])
    assert repr(s) == "<IpSet v4=3 v6=1 ranges>"
    for ip, expected in [
        ("10.2.3.4", True),
        ("11.0.0.1", False),
        ("192.168.1.7", True),
        ("192.168.1.8", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("172.16.5.5", True),
        ("::ffff:10.9.9.9", True),
    ]:
        address = parse_ip(ip)
        assert address is not None and s.contains(address) is expected, ip


@pytest.mark.parametrize(
    ("rules", "peer", "status"),
    [
        ({"allow": ["127.0.0.0/8"]}, "127.0.0.1", 200),
        ({"allow": ["10.0.0.0/8"]}, "127.0.0.1", 403),
        ({"deny": ["127.0.0.1"]}, "127.0.0.1", 403),
        ({"deny": ["10.0.0.0/8"]}, "127.0.0.1", 200),
        ({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]}, "127.0.0.1", 403),  # deny wins
        ({"allow": ["::1/128"]}, "::1", 200),
        ({"allow": ["2001:db8::/32"]}, "::1", 403),
        ({"deny": ["::/0"]}, "::1", 403),
    ],
)
def test_ip_restriction_rules(harness, rules, peer, status):
    result = harness({"plugins": [{"name": "ip-restriction", "config": rules}]}, peer=peer).request()
    assert result.status == status
    if status == 403:
        assert result.json()["message"] == "forbidden"


def test_x_forwarded_for_counts_only_through_trusted_proxies(harness):
    rules = {"allow": ["203.0.113.0/24"]}
    untrusted = harness({"plugins": [{"name": "ip-restriction", "config": rules}]})
    # a client not behind a trusted proxy cannot pick its address
    assert untrusted.request("GET", "/", {"X-Forwarded-For": "203.0.113.5"}).status == 403
    trusted = harness(
        {
            "gateway": {"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]},
            "plugins": [{"name": "ip-restriction", "config": rules}],
        }
    )
    assert trusted.request("GET", "/", {"X-Forwarded-For": "203.0.113.5"}).status == 200
    # through two trusted proxies (10.1.1.1 appended the client's address; we got it from 127.0.0.1)
    assert trusted.request("GET", "/", {"X-Forwarded-For": "203.0.113.5, 10.1.1.1"}).status == 200
    # the client prepended a fake address: the first untrusted hop from the right is what counts
    assert trusted.request("GET", "/", {"X-Forwarded-For": "203.0.113.5, 198.51.100.9"}).status == 403
    assert trusted.request("GET", "/", {"X-Forwarded-For": "198.51.100.9, 203.0.113.5"}).status == 200
    assert trusted.request("GET", "/", {"X-Forwarded-For": "garbage"}).status == 403


def test_custom_status_and_message(harness):
    gw = harness(
        {
            "plugins": [
                {
                    "name": "ip-restriction",
                    "config": {"deny": ["0.0.0.0/0"], "status": 451, "message": "not here"},
                }
            ]
        }
    )
    result = gw.request()
    assert result.status == 451
    assert result.json()["message"] == "not here"


# -- integration --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_acl_and_ip_restriction_through_a_real_gateway(gateway, backend):
    be = backend()
    cfg = gateway_config(
        be.url,
        routes=[
            {
                "name": "admin",
                "service": "backend",
                "paths": ["/admin"],
                "plugins": [{"name": "key-auth"}, {"name": "acl", "config": {"allow": ["admins"]}}],
            },
            {
                "name": "lan",
                "service": "backend",
                "paths": ["/lan"],
                "plugins": [{"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8"]}}],
            },
            {
                "name": "local",
                "service": "backend",
                "paths": ["/local"],
                "plugins": [{"name": "ip-restriction", "config": {"allow": ["127.0.0.1"]}}],
            },
        ],
    )
    cfg["consumers"] = CONSUMERS
    gw = gateway(cfg)
    assert request(gw.port, "GET", "/admin", headers={"apikey": "ann-key"}).status == 200
    assert be.seen[-1].header("x-consumer-groups") == "admins, staff"
    assert request(gw.port, "GET", "/admin", headers={"apikey": "sam-key"}).status == 403
    assert request(gw.port, "GET", "/lan").status == 403
    assert request(gw.port, "GET", "/local", headers={"X-Forwarded-For": "10.0.0.1"}).status == 200
    assert len(be.seen) == 2
