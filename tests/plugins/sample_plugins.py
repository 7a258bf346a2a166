"""Small plugins for pipeline tests, loaded by import path (``tests.plugins.sample_plugins:TagHigh``)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from tollway.errors import ClientError
from tollway.plugins import Exchange, Plugin, PluginConfig, Response


class TagConfig(PluginConfig):
    tag: str = "x"
    phase_header: str = Field("X-Trace", pattern=r"^[A-Za-z-]+$")


class _Tag(Plugin[TagConfig]):
    def access(self, ex: Exchange) -> None:
        ex.add_header(self.config.phase_header, f"{self.name}:{self.config.tag}")


class TagHigh(_Tag):
    name = "tag-high"
    priority = 3500


class TagMid(_Tag):
    name = "tag-mid"
    priority = 2000


class TagLow(_Tag):
    name = "tag-low"
    priority = 600


class TagRewrite(Plugin[TagConfig]):
    name = "tag-rewrite"
    priority = 10  # the rewrite phase runs before every access hook, whatever the priority

    def rewrite(self, ex: Exchange) -> None:
        ex.add_header(self.config.phase_header, f"{self.name}:{self.config.tag}")


class AsyncTag(Plugin[TagConfig]):
    name = "async-tag"
    priority = 1200

    async def access(self, ex: Exchange) -> None:  # type: ignore[override]
        await asyncio.sleep(0.001)
        ex.add_header(self.config.phase_header, f"{self.name}:{self.config.tag}")


class EmptyConfig(PluginConfig):
    pass


class Boom(Plugin[EmptyConfig]):
    name = "boom"
    priority = 1000

    def access(self, ex: Exchange) -> None:
        raise RuntimeError("plugin bug")


class AsyncBoom(Plugin[EmptyConfig]):
    name = "async-boom"
    priority = 1000

    async def access(self, ex: Exchange) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        raise RuntimeError("async plugin bug")


class Refuse(Plugin[EmptyConfig]):
    name = "refuse"
    priority = 1000

    def access(self, ex: Exchange) -> None:
        raise ClientError("refused on purpose")


class Teapot(Plugin[EmptyConfig]):
    name = "teapot"
    priority = 1000

    def access(self, ex: Exchange) -> Response:
        return Response(418, {"message": "short and stout"})


class ResponseBoom(Plugin[EmptyConfig]):
    name = "response-boom"
    priority = 500

    def response(self, ex: Exchange) -> None:
        raise RuntimeError("response bug")


class LogBoom(Plugin[EmptyConfig]):
    name = "log-boom"
    priority = 100

    def log(self, ex: Exchange) -> None:
        raise RuntimeError("log bug")


LOGGED: list[Any] = []


class LogRecorder(Plugin[EmptyConfig]):
    name = "log-recorder"
    priority = 100

    def log(self, ex: Exchange) -> None:
        LOGGED.append((ex.status, ex.consumer.username if ex.consumer is not None else None))


class NotAPlugin:
    name = "not-a-plugin"
