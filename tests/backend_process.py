"""A small HTTP/1.1 keep-alive backend, run as its own process by the upstream tests (so it can be
SIGKILLed and restarted on the same port).

    python tests/backend_process.py --port 0 --name a [--status 200] [--delay 0]

Prints ``listening on http://127.0.0.1:PORT`` once it accepts connections. Every path answers JSON
``{"instance": NAME, "path": ..., "method": ..., "body_length": N}``; ``/health`` answers
``{"status": "ok"}``; ``/status/NNN`` answers that status; ``/slow/SECONDS`` waits first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, status: int) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
            body = b""
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            code = status
            if target == "/health":
                payload = {"status": "ok", "instance": name}
                code = 200 if status < 500 else status
            else:
                if target.startswith("/slow/"):
                    await asyncio.sleep(float(target.split("/")[2]))
                if target.startswith("/status/"):
                    code = int(target.split("/")[2])
                payload = {"instance": name, "path": target, "method": method, "body_length": len(body)}
            data = json.dumps(payload).encode()
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                b"X-Instance: %s\r\nContent-Length: %d\r\n\r\n" % (code, name.encode(), len(data)) + data
            )
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="backend")
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.name, args.status), "127.0.0.1", args.port, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
