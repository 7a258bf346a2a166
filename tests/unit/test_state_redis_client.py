"""The RESP client's pure parts: encoding, cluster key slots, URLs (no sockets)."""

from __future__ import annotations

import pytest

from tollway.state.redis_backends import Cluster, Sentinel, Standalone, backend_from_url, key_slot
from tollway.state.redis_client import Script, encode


def test_encode() -> None:
    assert encode([b"SET", "k", 12, 1.5]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\n1.5\r\n"


def test_key_slot_uses_crc16_of_the_hash_tag() -> None:
    # reference values from Redis Cluster's specification (CRC16/XMODEM)
    assert key_slot(b"123456789") == 0x31C3 % 16384
    assert key_slot(b"foo") == 12182
    assert key_slot(b"tw:{user:1}:a") == key_slot(b"other{user:1}") == key_slot(b"user:1")
    assert key_slot(b"{}x") == key_slot(b"{}x")  # an empty tag hashes the whole key


def test_script_sha() -> None:
    assert Script("return 1").sha == b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"


def test_backend_urls() -> None:
    s = backend_from_url("redis://:secret@10.0.0.1:6380/2", timeout=0.1)
    assert isinstance(s, Standalone)
    assert (s.client.host, s.client.port, s.client.db, s.client.password) == ("10.0.0.1", 6380, 2, "secret")
    assert s.client.timeout == 0.1
    u = backend_from_url("redis://bob:pw@h")
    assert isinstance(u, Standalone) and (u.client.username, u.client.password, u.client.port) == (
        "bob",
        "pw",
        6379,
    )
    sentinel = backend_from_url("redis+sentinel://s1:26379,s2:26380/mymaster/1")
    assert isinstance(sentinel, Sentinel)
    assert sentinel.sentinels == [("s1", 26379), ("s2", 26380)] and sentinel.service == "mymaster"
    cluster = backend_from_url("redis+cluster://n1:7000,n2:7001")
    assert isinstance(cluster, Cluster) and cluster.startup_nodes == [("n1", 7000), ("n2", 7001)]
    with pytest.raises(ValueError):
        backend_from_url("memcached://x")
    with pytest.raises(ValueError):
        backend_from_url("redis+sentinel://s1:26379")
