"""Redis Sentinel and Redis Cluster with our own servers (from the installed redis-server, on free
ports, torn down after): the Sentinel backend follows a failover; the Cluster backend routes by slot,
follows MOVED after a slot moves and ASK while one is migrating."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from tests.state_support import ServerSet, free_cluster_port, redis_cli_binary, wait_until
from tollway.state.limits import RedisPolicy
from tollway.state.redis_backends import Cluster, Sentinel, key_slot
from tollway.state.shared import SharedTable
from tollway.state.spec import Decision, LimitSpec

pytestmark = pytest.mark.integration


async def resolve(result: object) -> Decision:
    return result if isinstance(result, Decision) else await result  # type: ignore[misc]


# -- Sentinel ----------------------------------------------------------------------------------------------
async def test_sentinel_follows_a_failover(servers: ServerSet, table: SharedTable) -> None:
    master = servers.start(name="master")
    replica = servers.start(["--replicaof", "127.0.0.1", str(master.port)], name="replica")
    wait_until(
        lambda: replica.client().info("replication").get("master_link_status") == "up",
        15,
        message="replica in sync",
    )
    sentinel = servers.start_sentinel(
        [
            f"sentinel monitor svc 127.0.0.1 {master.port} 1",
            "sentinel down-after-milliseconds svc 1000",
            "sentinel failover-timeout svc 5000",
        ]
    )

    def replica_ready() -> bool:
        replicas = sentinel.client().sentinel_slaves("svc")
        return (
            len(replicas) == 1
            and replicas[0].get("master-link-status") == "ok"
            and not replicas[0].get("is_disconnected")
            and not replicas[0].get("is_sdown")
            and replicas[0].get("info-refresh", 10**9) < 5000
        )

    wait_until(replica_ready, 30, message="sentinel sees a healthy replica")
    backend = Sentinel([sentinel.address], "svc", timeout=0.5, connect_timeout=0.5)
    spec = LimitSpec("hour", 1000, 3600)
    policy = RedisPolicy(spec, backend, table=table, server_time=False)
    now = 1_000_000_800.0
    try:
        for _ in range(10):
            assert (await resolve(policy.check("alice", now))).degraded == ""
        assert backend.master is not None and backend.master.port == master.port
        key = policy.redis_key("alice")
        wait_until(lambda: replica.client().hget(key, "c") == b"10", 10, message="count replicated")

        sentinel.client().execute_command("SENTINEL", "FAILOVER", "svc")
        wait_until(
            lambda: int(sentinel.client().sentinel_get_master_addr_by_name("svc")[1]) == replica.port,
            30,
            message="sentinel promoted the replica",
        )
        # Counts written to the old master after the promotion are lost (asynchronous replication):
        # only what reaches the new master counts from here on.
        deadline = time.monotonic() + 30
        on_new_master = 0
        while on_new_master < 5:
            decision = await resolve(policy.check("alice", now))
            if not decision.degraded and backend.master is not None and backend.master.port == replica.port:
                on_new_master += 1
            assert time.monotonic() < deadline, f"still not on the new master: {backend!r}"
            await asyncio.sleep(0.01)
        assert decision.remaining == 1000 - 10 - on_new_master  # the replicated count, and on from it
        assert backend.failovers == 1
    finally:
        await backend.close()


# -- Cluster ------------------------------------------------------------------------------------------------
NODE_TIMEOUT = ["--cluster-node-timeout", "3000"]


@pytest.fixture
def cluster(servers: ServerSet) -> list:  # type: ignore[type-arg]
    nodes = [
        servers.start(
            ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *NODE_TIMEOUT],
            port=free_cluster_port(),
            name=f"node{i}",
        )
        for i in range(3)
    ]
    cmd = [redis_cli_binary(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
    cmd += ["--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for node in nodes:
        wait_until(
            lambda node=node: node.client().cluster("info")["cluster_state"] == "ok",
            30,
            message="cluster state ok",
        )
    return nodes


def owner(nodes: list, slot: int):  # type: ignore[no-untyped-def,type-arg]
    """The node that owns `slot`, as the cluster itself says."""
    raw = nodes[0].client().execute_command("CLUSTER", "SLOTS")
    for first, last, master, *_ in raw:
        if first <= slot <= last:
            return next(n for n in nodes if n.port == int(master[1]))
    raise AssertionError(f"no owner for slot {slot}")


def node_id(node) -> str:  # type: ignore[no-untyped-def]
    return node.client().execute_command("CLUSTER", "MYID").decode()


async def test_cluster_routes_by_slot_and_follows_moved_and_ask(
    cluster: list,  # type: ignore[type-arg]
    table: SharedTable,
) -> None:
    nodes = cluster
    backend = Cluster([nodes[0].address], timeout=1.0, connect_timeout=1.0)
    spec = LimitSpec("hour", 5, 3600)
    policy = RedisPolicy(spec, backend, table=table, server_time=False)
    now = 1_000_000_800.0
    try:
        users = [f"user-{i}" for i in range(12)]
        for user in users:
            key = policy.redis_key(user)
            assert key_slot(key) == nodes[0].client().execute_command("CLUSTER", "KEYSLOT", key)
            admitted = [(await resolve(policy.check(user, now))).allowed for _ in range(7)]
            assert admitted == [True] * 5 + [False] * 2
        assert len({backend.slots[key_slot(policy.redis_key(u))] for u in users}) == 3  # all nodes used
        assert backend.stats.redirects == 0

        # MOVED: move one user's slot (with its key) to another node behind the client's back
        moved_user = "mover"
        key = policy.redis_key(moved_user)
        slot = key_slot(key)
        assert (await resolve(policy.check(moved_user, now))).remaining == 4
        source = owner(nodes, slot)
        target = next(n for n in nodes if n is not source)
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
        source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        for node in nodes:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))
        decision = await resolve(policy.check(moved_user, now))
        assert decision.degraded == "" and decision.remaining == 3  # the count moved with the key
        assert backend.stats.redirects == 1
        assert backend.slots[slot] == target.address

        # ASK: a slot half-way through migrating; a new key is created on the importing node
        candidates = (f"asked-{i}" for i in range(100))
        asked_user = next(u for u in candidates if key_slot(policy.redis_key(u)) != slot)
        key = policy.redis_key(asked_user)
        slot = key_slot(key)
        source = owner(nodes, slot)
        target = next(n for n in nodes if n is not source)
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
        decision = await resolve(policy.check(asked_user, now))
        assert decision.allowed and decision.degraded == "" and decision.remaining == 4
        assert target.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        assert source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert backend.stats.redirects == 2
        assert backend.slots[slot] == source.address  # ASK does not change the map
    finally:
        await backend.close()
