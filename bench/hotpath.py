"""The gateway's own per-request Python cost, without sockets: a repeatable figure to optimise against.

Drives a real `ClientConnection` and a pooled `UpstreamConnection` through in-memory transports: each
iteration feeds one request head to the client side, and one backend response to the upstream side,
exactly as the event loop would. What it measures is everything Tollway does per request in Python
(parsing, routing, header rewriting, framing, pooling, logging), minus the kernel's share, which
`bench/run.sh` adds back.

    python bench/hotpath.py [--requests N] [--config FILE] [--path /user/1] [--header 'apikey: key-42']
    python bench/hotpath.py --config bench/cache-node.yaml --cacheable   (a response-cache hit)
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tests/

from tests.memory_transport import CountingTransport
from tollway.config.loader import load_file, load_text
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.pool import PoolSettings

DEFAULT_CONFIG = """
gateway: {access_log: {enabled: false}}
services: [{name: backend, url: "http://127.0.0.1:9001"}]
routes: [{name: all, service: backend, paths: ["/"]}]
"""
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 18:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 23\r\nConnection: keep-alive\r\n\r\n"
    b'{"id":1,"name":"alice"}'
)


def measure(
    config_text: str | None,
    config_file: Path | None,
    requests: int,
    request: bytes,
    warmup: int = 2000,
    use_uvloop: bool = False,
    response: bytes = RESPONSE,
) -> float:
    if use_uvloop:  # the workers' loop: loop.time() and timers are C calls there, Python on asyncio's
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if config_file:
        config = load_file(config_file, PLUGIN_CHECK)
    else:
        config = load_text(config_text or DEFAULT_CONFIG, plugins=PLUGIN_CHECK)
    worker = Worker(loop, 0, None, [])  # type: ignore[arg-type]
    worker.pool_settings = PoolSettings(max_requests=0)  # one warm connection for the whole run
    worker.apply_config(1, config)
    client = ClientConnection(worker)
    client.connection_made(CountingTransport())  # type: ignore[arg-type]
    # One warm upstream connection idle in each pool of the first service's cluster (one pool when every
    # target has the same address); each request is answered on the connection its exchange took.
    cluster = next(iter(worker.snapshot.services.values())).cluster
    for pool in cluster.pools:
        pool.settings = worker.pool_settings  # an upstream's own pools too: one connection for the run
        upstream = UpstreamConnection(pool)
        upstream.connection_made(CountingTransport((pool.host, pool.port)))  # type: ignore[arg-type]
        pool.active += 1
        pool.release(upstream)
    if len(cluster.pools) == 1:
        only = upstream

        def one() -> None:
            client.data_received(request)
            if client.active is not None:  # not answered by the gateway itself (a cache hit)
                only.data_received(response)
    else:

        def one() -> None:
            client.data_received(request)
            if client.active is not None:
                client.active.upstream.data_received(response)  # type: ignore[union-attr]

    # Plugins may ask for the running loop (the cache's coalescing futures): the driver plays the loop.
    asyncio.events._set_running_loop(loop)
    for _ in range(warmup):
        one()
    start = time.perf_counter()
    for _ in range(requests):
        one()
    elapsed = time.perf_counter() - start
    assert client.transport.written > 0 and client.active is None, "the exchange did not complete"  # type: ignore[union-attr]
    asyncio.events._set_running_loop(None)
    loop.close()
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--path", default="/user/1")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the workers do")
    parser.add_argument(
        "--cacheable",
        action="store_true",
        help="the backend answers Cache-Control: public, max-age=3600 (with proxy-cache: all hits)",
    )
    args = parser.parse_args()
    extra = "".join(f"{h}\r\n" for h in args.header).encode()
    response = RESPONSE
    if args.cacheable:
        now = email.utils.formatdate(usegmt=True).encode()  # a week-old Date would make the copy stale
        response = RESPONSE.replace(b"Thu, 26 Nov 2026 18:00:00 GMT", now).replace(
            b"\r\n\r\n", b"\r\nCache-Control: public, max-age=3600\r\n\r\n", 1
        )
    request = b"GET " + args.path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n" + extra + b"\r\n"
    runs = [
        measure(None, args.config, args.requests, request, args.warmup, args.uvloop, response)
        for _ in range(args.repeat)
    ]
    print(
        f"hot path: {min(runs):.2f} µs/request (best of {args.repeat}; runs: "
        + ", ".join(f"{r:.2f}" for r in runs)
        + ")"
    )


if __name__ == "__main__":
    main()
