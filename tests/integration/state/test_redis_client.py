"""The thin RESP client against real Redis servers: multiplexing, cancellation safety, deadlines that
drop the connection, backoff, NOSCRIPT, AUTH and SELECT."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.state_support import ServerSet, free_port
from tests.tls_support import self_signed
from tollway.state.redis_backends import Standalone, backend_from_url
from tollway.state.redis_client import RedisClient, RedisReplyError, RedisTimeout, RedisUnavailable, Script

pytestmark = pytest.mark.integration


async def test_many_concurrent_calls_share_one_connection(
    redis_address: tuple[str, int], prefix: str
) -> None:
    client = RedisClient(*redis_address, timeout=5.0)
    try:
        replies = await asyncio.gather(*(client.call("INCR", prefix + "n") for _ in range(300)))
        assert sorted(replies) == list(range(1, 301))
        assert client.stats.connects == 1
        assert repr(client).endswith("connections=1/1>")
    finally:
        await client.close()


async def test_a_cancelled_caller_never_shifts_the_replies(
    redis_address: tuple[str, int], prefix: str
) -> None:
    client = RedisClient(*redis_address, timeout=5.0)
    try:
        for i in range(50):
            await client.call("SET", f"{prefix}{i}", f"v{i}")
        tasks = [asyncio.ensure_future(client.call("GET", f"{prefix}{i}")) for i in range(50)]
        await asyncio.sleep(0)  # written, replies not read yet
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 2:
                assert result == f"v{i}".encode()
            else:
                assert isinstance(result, asyncio.CancelledError)
        # and the connection is still in step
        assert await client.call("GET", f"{prefix}7") == b"v7"
        assert client.stats.connects == 1
    finally:
        await client.close()


async def test_error_replies_and_scripts(redis_address: tuple[str, int], prefix: str) -> None:
    client = RedisClient(*redis_address, timeout=5.0)
    try:
        await client.call("SET", prefix + "s", "x")
        with pytest.raises(RedisReplyError) as info:
            await client.call("INCR", prefix + "s")
        assert info.value.kind == "ERR"
        script = Script(f"return redis.call('INCRBY', KEYS[1], ARGV[1]) -- {prefix}", "incrby")
        assert await client.evalsha(script, [prefix + "c"], [5]) == 5  # first run: NOSCRIPT -> EVAL
        assert await client.evalsha(script, [prefix + "c"], [5]) == 10
        assert client.stats.noscript == 1
    finally:
        await client.close()


async def test_noscript_after_a_script_flush_reloads(servers: ServerSet) -> None:
    server = servers.start()
    client = RedisClient(*server.address, timeout=5.0)
    try:
        script = Script("return 41 + tonumber(ARGV[1])")
        assert await client.evalsha(script, [], [1]) == 42
        server.client().script_flush()
        assert await client.evalsha(script, [], [2]) == 43
        assert client.stats.noscript == 2
    finally:
        await client.close()


async def test_a_silent_server_times_out_drops_the_connection_and_recovers(servers: ServerSet) -> None:
    server = servers.start()
    client = RedisClient(*server.address, timeout=0.2, connect_timeout=0.5)
    try:
        assert await client.call("PING") == b"PONG"
        server.pause()  # connected, but nobody answers
        calls = asyncio.gather(*(client.call("PING") for _ in range(5)), return_exceptions=True)
        results = await asyncio.wait_for(calls, 10)  # (a guard; the client's deadline is 0.2 s)
        assert all(isinstance(r, RedisTimeout) for r in results)
        assert client.stats.timeouts == 1 and client.stats.errors == 5  # one deadline failed all five
        server.resume()
        assert await client.call("PING") == b"PONG"  # a fresh connection, not the abandoned one
        assert client.stats.connects == 2
    finally:
        server.resume()
        await client.close()


async def test_refused_connections_fail_fast_and_back_off() -> None:
    client = RedisClient("127.0.0.1", free_port(), timeout=0.2, connect_timeout=0.5)
    try:
        with pytest.raises(RedisUnavailable):
            await client.call("PING")
        with pytest.raises(RedisUnavailable, match="retrying shortly"):
            await client.call("PING")  # within the backoff: no new connect attempt
        assert client.stats.failed_connects == 1
    finally:
        await client.close()


async def test_auth_and_select(servers: ServerSet) -> None:
    server = servers.start(["--requirepass", "s3cret"])
    client = RedisClient(*server.address, password="s3cret", db=3, timeout=5.0)
    try:
        await client.call("SET", "k", "in-db-3")
        assert server.client(db=3).get("k") == b"in-db-3"
        assert server.client(db=0).get("k") is None
    finally:
        await client.close()
    wrong = Standalone(RedisClient(*server.address, password="nope", timeout=1.0, connect_timeout=1.0))
    try:
        with pytest.raises(RedisReplyError):  # AUTH refused during the handshake
            await wrong.call("PING")
    finally:
        await wrong.close()


async def test_a_restarted_server_is_reconnected(servers: ServerSet) -> None:
    server = servers.start()
    client = RedisClient(*server.address, timeout=0.5, connect_timeout=0.5)
    try:
        assert await client.call("PING") == b"PONG"
        server.stop()
        with pytest.raises(RedisUnavailable):
            await client.call("PING")
        server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await client.call("PING") == b"PONG"
                break
            except RedisUnavailable:
                assert time.monotonic() < deadline, "no reconnect within 10 s"
                await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_rediss_urls_speak_tls(servers: ServerSet, tmp_path) -> None:
    cert = self_signed(tmp_path / "tls")
    tls_port = free_port()
    servers.start(
        [
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert.cert_file),
            "--tls-key-file", str(cert.key_file),
            "--tls-ca-cert-file", str(cert.cert_file),
            "--tls-auth-clients", "no",
        ]
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0"
    trusted = backend_from_url(url, ssl=cert.client_context(), timeout=2.0, connect_timeout=2.0)
    untrusted = backend_from_url(url, timeout=2.0, connect_timeout=2.0)  # the system's CAs
    plain = backend_from_url(f"redis://127.0.0.1:{tls_port}/0", timeout=0.5, connect_timeout=0.5)
    try:
        assert await trusted.call(b"PING") == b"PONG"
        assert await trusted.script(Script("return 'tls'"), b"twtest:tls", ()) == b"tls"
        with pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.call(b"PING")
        with pytest.raises((RedisUnavailable, RedisTimeout)):
            await plain.call(b"PING")  # clear text to a TLS port gets no answer
    finally:
        for backend in (trusted, untrusted, plain):
            await backend.close()
