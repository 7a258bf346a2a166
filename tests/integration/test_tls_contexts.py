"""Server TLS contexts in process (tollway.protocol.tls) on a real uvloop server on 127.0.0.1: the CAs
that verify client certificates reload live, with the listener's context unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.tls_support import CA, client_context
from tollway.config.loader import validate
from tollway.protocol.tls import ServerTls

pytestmark = pytest.mark.integration


def test_client_ca_reloads_live(tmp_path: Path) -> None:
    server_ca, first, second = CA(), CA("first"), CA("second")
    server = server_ca.issue(["a.test"]).write(tmp_path, "a")
    one = first.issue([], client=True, common_name="one").write(tmp_path, "one")
    two = second.issue([], client=True, common_name="two").write(tmp_path, "two")

    def config(ca_file: str) -> Any:
        return validate(
            {
                "gateway": {"listen": ["127.0.0.1:0 mtls"], "tls": {"client_auth": {"ca_file": ca_file}}},
                "certificates": [{"name": "a", "cert": server[0], "key": server[1]}],
            }
        )

    tls = ServerTls(config(first.write(tmp_path, "first")))

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                transport.write(b"ok")
                transport.close()

        base = tls.base_context(True)
        server_obj = await loop.create_server(Answer, "127.0.0.1", 0, ssl=base, ssl_handshake_timeout=5)
        port = server_obj.sockets[0].getsockname()[1]

        async def attempt(cert: tuple[str, str]) -> bytes:
            context = client_context(server_ca.write(tmp_path, "server-ca"), cert=cert)
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="a.test"
                )
                data = await reader.read()
                writer.close()
                return data
            except (OSError, EOFError):  # ssl.SSLError is an OSError
                return b"refused"

        results = [await attempt(one), await attempt(two)]
        assert tls.apply(config(second.write(tmp_path, "second")))
        assert tls.base_context(True) is base  # the listener keeps its context
        results += [await attempt(one), await attempt(two)]
        server_obj.close()
        return results

    ok, refused_two, refused_one, ok_two = uvloop.run(main())
    assert ok == b"ok" and ok_two == b"ok"
    assert refused_two != b"ok" and refused_one != b"ok"  # TLS 1.3: the refusal may arrive as EOF
