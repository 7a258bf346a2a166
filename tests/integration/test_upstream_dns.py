"""Hostname targets: the hosts file, A/AAAA and SRV answers from a local DNS stub (no internet), TTLs,
and DNS failover — a failed or empty answer keeps the last good set."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from tests.support import request
from tests.upstream_support import timed, upstream_status
from tollway.config.loader import validate
from tollway.config.schema import DnsSettings
from tollway.upstream.supervisor_dns import ResolveError, Resolver
from tollway.upstream.supervisor_manager import UpstreamManager

pytestmark = pytest.mark.integration


class DnsStub:
    """A DNS server on 127.0.0.1 (UDP) answering from `records`: {(name, type): (ttl, [rdata text])}.
    `rcode` set to SERVFAIL makes every answer a failure."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.rcode = dns.rcode.NOERROR
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 1) -> None:
        self.records[(name.rstrip(".").lower(), rdtype)] = (ttl, values)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if self.rcode != dns.rcode.NOERROR:
                answer.set_rcode(self.rcode)
            elif (name, rdtype) in self.records:
                ttl, values = self.records[(name, rdtype)]
                if values:
                    answer.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *values))
            elif not any(n == name for n, _ in self.records):
                answer.set_rcode(dns.rcode.NXDOMAIN)
            answer.flags |= dns.flags.AA
            self.sock.sendto(answer.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def stub() -> Iterator[DnsStub]:
    server = DnsStub()
    yield server
    server.close()


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# a hosts file\n127.0.0.1 localhost myapp.test\n::1 localhost ip6-localhost\n")
    return path


def settings(stub: DnsStub, hosts: Path | None = None) -> DnsSettings:
    return DnsSettings(nameservers=[stub.address], hosts_file=str(hosts) if hosts else None, timeout=1)


# -- the resolver --------------------------------------------------------------------------------------------
async def test_addresses_with_their_ttls(stub):
    stub.set("api.test", "A", ["127.0.0.1", "127.0.0.2"], ttl=7)
    stub.set("api.test", "AAAA", ["::1"], ttl=3)
    resolver = Resolver(settings(stub))
    got = await resolver.addresses("api.test", ["A", "AAAA"])
    assert sorted((a.ip, a.ttl) for a in got) == [("127.0.0.1", 7), ("127.0.0.2", 7), ("::1", 3)]
    assert sorted(a.ip for a in await resolver.addresses("api.test", ["A"])) == ["127.0.0.1", "127.0.0.2"]
    with pytest.raises(ResolveError, match="no such name"):
        await resolver.addresses("missing.test", ["A"])


async def test_the_hosts_file_comes_first(stub, hosts_file):
    stub.set("myapp.test", "A", ["10.9.9.9"])
    resolver = Resolver(settings(stub, hosts_file))
    assert [a.ip for a in await resolver.addresses("myapp.test", ["A", "AAAA"])] == ["127.0.0.1"]
    assert [a.ip for a in await resolver.addresses("LOCALHOST", ["AAAA"])] == ["::1"]
    assert stub.queries == []
    hosts_file.write_text("127.0.0.5 myapp.test\n")  # a changed file is read again
    assert [a.ip for a in await resolver.addresses("myapp.test", ["A"])] == ["127.0.0.5"]


async def test_srv_records_give_ports_weights_and_backups(stub):
    stub.set(
        "_app._tcp.svc.test",
        "SRV",
        ["10 60 8001 a.svc.test.", "10 20 8002 b.svc.test.", "20 0 8003 c.svc.test."],
        ttl=30,
    )
    stub.set("a.svc.test", "A", ["127.0.0.1"], ttl=5)
    stub.set("b.svc.test", "A", ["127.0.0.2"])
    stub.set("c.svc.test", "A", ["127.0.0.3"])
    resolver = Resolver(settings(stub))
    records, ttl = await UpstreamManager.resolve(resolver, "_app._tcp.svc.test", True, _dns_options())
    assert records == [
        ("127.0.0.1", 8001, 60, False),
        ("127.0.0.2", 8002, 20, False),
        ("127.0.0.3", 8003, 1, True),  # a lower priority: a backup; weight 0 counts as 1
    ]
    assert ttl == 1  # the shortest of the SRV and address TTLs


def _dns_options(**kw: Any) -> Any:
    from tollway.config.schema import UpstreamDns

    return UpstreamDns(**kw)


# -- the supervisor's loop: TTLs and DNS failover ------------------------------------------------------------
async def test_answers_follow_ttls_and_failures_keep_the_last_good_set(stub, caplog):
    stub.set("api.test", "A", ["127.0.0.1"], ttl=1)
    config = validate(
        {
            "gateway": {"dns": {"nameservers": [stub.address], "hosts_file": None, "timeout": 0.5}},
            "upstreams": [
                {
                    "name": "api",
                    "targets": [{"target": "api.test:8080"}],
                    "dns": {"min_ttl": 0.1, "error_ttl": 0.2, "record_types": ["A"]},
                }
            ],
        }
    )
    sent: list[tuple[Any, ...]] = []
    manager = UpstreamManager(lambda message, skip: sent.append(message), lambda: [])
    await manager.start(config)
    try:
        assert manager.resolved[("api", "api.test:8080")] == [("127.0.0.1", 8080, -1, False)]
        assert sent == [("upstream_dns", "api", "api.test:8080", [("127.0.0.1", 8080, -1, False)])]
        stub.set("api.test", "A", ["127.0.0.1", "127.0.0.2"], ttl=1)  # seen when the TTL is up
        assert await _eventually(lambda: len(manager.resolved[("api", "api.test:8080")]) == 2, 4)
        with caplog.at_level(logging.WARNING, "tollway.upstream"):
            stub.rcode = dns.rcode.SERVFAIL
            assert await _eventually(lambda: manager.dns_info[("api", "api.test:8080")]["error"], 4)
            stub.rcode = dns.rcode.NOERROR
            stub.set("api.test", "A", [])  # an empty answer is no better
            await asyncio.sleep(0.5)
        assert len(manager.resolved[("api", "api.test:8080")]) == 2  # the last good set stays
        assert "keeping the last good set (2 addresses)" in caplog.text
        assert all(m[3] for m in sent)  # never an empty set sent to workers
        assert manager.summary() == {"api": {"targets": 2, "available": 2, "unhealthy": 0, "ejected": 0}}
    finally:
        await manager.stop()


async def _eventually(predicate: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


# -- through a gateway ---------------------------------------------------------------------------------------
def dns_gateway_config(stub: DnsStub, hosts: Path | None, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "gateway": {
            "listen": ["127.0.0.1:0"],
            "status_listen": "127.0.0.1:0",
            "access_log": {"enabled": False},
            "dns": {
                "nameservers": [stub.address],
                "hosts_file": str(hosts) if hosts else None,
                "timeout": 0.5,
            },
        },
        "upstreams": [{"name": "app", "targets": targets, "dns": {"min_ttl": 0.2, "error_ttl": 0.3}}],
        "services": [{"name": "app", "upstream": "app"}],
        "routes": [{"name": "app", "service": "app", "paths": ["/"]}],
    }


def test_srv_targets_follow_dns_and_survive_its_failure(gateway, backend, stub, caplog):
    first, second = backend(), backend()
    stub.set("_app._tcp.svc.test", "SRV", [f"10 10 {first.port} node.svc.test."])
    stub.set("node.svc.test", "A", ["127.0.0.1"])
    gw = gateway(dns_gateway_config(stub, None, [{"target": "_app._tcp.svc.test", "srv": True}]), workers=2)
    assert request(gw.port, "GET", "/x").status == 200 and len(first.seen) == 1
    stub.set("_app._tcp.svc.test", "SRV", [f"10 10 {second.port} node.svc.test."])
    assert timed(lambda: request(gw.port, "GET", "/x").status == 200 and len(second.seen) > 0, 5) is not None
    stub.rcode = dns.rcode.SERVFAIL  # DNS fails: the last good set keeps serving
    gw.wait_for_output(r"resolving _app._tcp.svc.test failed .*keeping the last good set \(1 addresses\)")
    for _ in range(5):
        assert request(gw.port, "GET", "/x").status == 200
    targets = upstream_status(gw.status_port, "app")["targets"]
    assert [(t["target"], t["address"]) for t in targets] == [
        ("_app._tcp.svc.test", f"127.0.0.1:{second.port}")
    ]
    assert upstream_status(gw.status_port, "app")["dns"]["_app._tcp.svc.test"]["error"]


def test_a_hosts_file_name_is_a_target(gateway, backend, stub, hosts_file):
    be = backend()
    gw = gateway(dns_gateway_config(stub, hosts_file, [{"target": f"myapp.test:{be.port}"}]))
    assert request(gw.port, "GET", "/x").status == 200
    assert be.seen[-1].header("host") == f"127.0.0.1:{be.port}"
    targets = upstream_status(gw.status_port, "app")["targets"]
    assert [(t["target"], t["address"]) for t in targets] == [
        (f"myapp.test:{be.port}", f"127.0.0.1:{be.port}")
    ]
