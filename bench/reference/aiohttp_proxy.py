"""The reverse proxy a Python user writes by hand: an aiohttp server and a pooled aiohttp client on
uvloop. A floor for comparison, not a design to copy.

    python aiohttp_proxy.py [port]      (default 9103; forwards to the backend on 127.0.0.1:9001)
"""

import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = "http://127.0.0.1:9001"
HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "host",
    "content-length",
}


async def make_app() -> web.Application:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with session.request(
            request.method, UPSTREAM + request.path_qs, headers=headers, data=body
        ) as r:
            data = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
            return web.Response(status=r.status, body=data, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    uvloop.install()
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9103
    web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None, print=None)
