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


class AnswersItself(Plugin[EmptyConfig]):
    """Answers through `ex.respond` and returns None, as a compiled fast path does (proxy-cache)."""

    name = "answers-itself"
    priority = 1100

    def access(self, ex: Exchange) -> None:
        ex.respond(Response(418, {"message": "answered in the hook"}))


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


class RouteFields(Plugin[EmptyConfig]):
    """Reports what routing set on the request (X-Route-Fields), then changes `ex.params`: the next
    request with the same URL must see neither that change nor anything else differently."""

    name = "route-fields"
    priority = 1000

    def access(self, ex: Exchange) -> None:
        params = ",".join(f"{k}={v}" for k, v in sorted(ex.params.items()))
        route = ex.route.name if ex.route is not None else None
        service = ex.service.name if ex.service is not None else None
        fields = [ex.path, ex.raw_path, ex.query, params, route, service, ex.upstream_path.decode()]
        ex.add_header("X-Route-Fields", " | ".join(map(str, fields)))
        if ex.params:
            ex.params["id"] = "tampered"


class NotAPlugin:
    name = "not-a-plugin"


# -- the authentication plugin of docs/plugins/writing-plugins.md, verbatim ---------------------------------
from tollway.plugins import HeaderName, PluginContext  # noqa: E402
from tollway.plugins.builtin.auth import AuthConfig, AuthPlugin  # noqa: E402


class TokenConfig(AuthConfig):
    header: HeaderName = "X-Token"


class TokenCredential(PluginConfig):
    token: str

    def identity(self) -> str:
        return self.token


class TokenAuth(AuthPlugin[TokenConfig]):
    name = "token-auth"
    priority = 2300
    consumer_credential = TokenCredential
    scheme = "Token"

    def __init__(self, config: TokenConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.tokens = context.shared(
            "tokens",
            lambda: {
                c.token.encode(): (consumer, c)
                for consumer, c in context.consumers.credentials(self.name, TokenCredential)
            },
        )
        self.lname = config.header.lower().encode()

    def access(self, ex: Exchange) -> Response | None:
        if self.already_authenticated(ex):
            return None
        found = self.tokens.get(ex.header_bytes(self.lname) or b"")
        if found is None:
            return self.reject(ex)
        self.accept(ex, *found)
        return None
