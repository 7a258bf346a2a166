"""Runs a route's plugin hooks, phase by phase, on an exchange.

Phases, in order (Kong's and APISIX's vocabulary):
  rewrite  — before anything else; may change the request (path, headers)
  access   — authentication, authorization, limits; may answer instead of the backend
  response — the backend's response head has arrived; may change its headers (synchronous)
  log      — the response is sent; record, count, export (synchronous; queue slow work)

A hook is a plain callable taking the exchange (the request context). In `rewrite` and `access` it
returns None to go on (or after answering itself with `ex.respond...`), a `Response` to answer now, or
an awaitable (when it must wait for I/O: a Redis counter, a JWKS fetch) whose result is either of
those. Only then is a task created, so a chain of hooks that need no I/O costs no coroutine switch.
A hook that raises gets its request a 500 with the request id, and the traceback in the log under the
plugin's name; the worker lives on.

Consumers: plugins may be configured for one consumer, who is known only once an authentication hook
has run. A pipeline whose route has such plugins carries a `ConsumerPipelines`; after each request hook
that leaves a consumer on the exchange, the consumer's own pipeline (built on first use, then cached)
takes over from the same point in the order — the hooks that sort after the one that just ran.

The hook lists are built once per config version (by `tollway.plugins.build`); nothing here
allocates per request unless a hook awaits.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tollway.errors import PluginError, TollwayError
from tollway.proxy.responses import Response

if TYPE_CHECKING:
    from tollway.proxy.exchange import Exchange

Hook = Callable[["Exchange"], Any]
# A request hook's place in the order, comparable across a route's pipelines (see plugins.build).
OrderKey = tuple[Any, ...]
_CACHE_LIMIT = 4096


class Pipeline:
    __slots__ = (
        "access",
        "consumers",
        "has_log",
        "has_response",
        "keys",
        "log",
        "log_names",
        "name",
        "names",
        "request",
        "response",
        "response_names",
        "rewrite",
    )

    def __init__(
        self,
        rewrite: tuple[Hook, ...] = (),
        access: tuple[Hook, ...] = (),
        response: tuple[Hook, ...] = (),
        log: tuple[Hook, ...] = (),
        name: str = "",
        names: tuple[str, ...] = (),
        keys: tuple[OrderKey, ...] = (),
        response_names: tuple[str, ...] = (),
        log_names: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.rewrite = rewrite
        self.access = access
        self.request: tuple[Hook, ...] = rewrite + access
        self.response = response
        self.log = log
        self.has_response = bool(response)
        self.has_log = bool(log)
        count = len(self.request)
        # Who each hook belongs to (for logs) and its place in the order (to resume on another pipeline).
        self.names: tuple[str, ...] = names or ("?",) * count
        self.keys: tuple[OrderKey, ...] = keys or tuple((i,) for i in range(count))
        self.response_names: tuple[str, ...] = response_names or ("?",) * len(response)
        self.log_names: tuple[str, ...] = log_names or ("?",) * len(log)
        self.consumers: ConsumerPipelines | None = None

    def __repr__(self) -> str:
        return (
            f"<Pipeline {self.name} rewrite={len(self.rewrite)} access={len(self.access)} "
            f"response={len(self.response)} log={len(self.log)}>"
        )

    def run_request(self, ex: Exchange) -> None:
        """rewrite + access hooks, then `ex.proceed()` — unless a hook answers or fails."""
        self.continue_request(ex, 0)

    def continue_request(self, ex: Exchange, start: int) -> None:
        hooks = self.request
        for index in range(start, len(hooks)):
            try:
                result = hooks[index](ex)
            except Exception as exc:
                self._hook_failed(ex, index, exc)
                return
            if result is None:
                if ex.done:  # the hook answered itself (RequestContext.respond_serialized)
                    return
                if self.consumers is not None and self._switch(ex, index):
                    return
                continue
            if isinstance(result, Response):
                ex.respond(result)
                return
            if ex.done:
                return
            asyncio.get_running_loop().create_task(self._await_hook(ex, result, index))
            return
        ex.proceed()

    async def _await_hook(self, ex: Exchange, pending: Awaitable[Any], index: int) -> None:
        try:
            result = await pending
        except Exception as exc:
            self._hook_failed(ex, index, exc)
            return
        if ex.done:
            return  # the client left while the hook waited
        if isinstance(result, Response):
            ex.respond(result)
            return
        if self.consumers is not None and self._switch(ex, index):
            return
        self.continue_request(ex, index + 1)

    def _switch(self, ex: Exchange, index: int) -> bool:
        """If the hook at `index` identified a consumer with plugins of its own, continue the request
        on that consumer's pipeline, after the hooks that sort before or at this one."""
        consumer = ex.consumer
        consumers = self.consumers
        if consumer is None or consumers is None or ex.pipeline is not self:
            return False
        other = consumers.pipeline_for(consumer)
        if other is None or other is self:
            return False
        ex.pipeline = other
        other.continue_request(ex, bisect_right(other.keys, self.keys[index]))
        return True

    def _hook_failed(self, ex: Exchange, index: int, exc: Exception) -> None:
        if isinstance(exc, TollwayError):  # raised on purpose, with the status it maps to
            ex.fail(exc)
            return
        phase = "rewrite" if index < len(self.rewrite) else "access"
        ex.client.worker.log_exception(f"plugin {self.names[index]!r} failed in {phase}", exc, ex)
        ex.fail(PluginError())

    def run_response(self, ex: Exchange) -> Exception | None:
        """Response hooks; an exception is returned (the exchange answers 500 instead)."""
        hooks = self.response
        for index in range(len(hooks)):
            try:
                hooks[index](ex)
            except Exception as exc:
                if isinstance(exc, TollwayError):
                    return exc
                name = self.response_names[index]
                ex.client.worker.log_exception(f"plugin {name!r} failed in response", exc, ex)
                return PluginError()
        return None

    def run_log(self, ex: Exchange) -> None:
        hooks = self.log
        for index in range(len(hooks)):
            try:
                hooks[index](ex)
            except Exception as exc:
                ex.client.worker.log_exception(f"plugin {self.log_names[index]!r} failed in log", exc, ex)


class ConsumerPipelines:
    """The pipelines a route's requests switch to once a consumer is identified, built on first use by
    `build(consumer)` (None: this consumer has no plugins of its own here) and cached, bounded."""

    __slots__ = ("_build", "_cache")

    def __init__(self, build: Callable[[Any], Pipeline | None]) -> None:
        self._build = build
        self._cache: dict[Any, Pipeline | None] = {}

    def __repr__(self) -> str:
        return f"<ConsumerPipelines cached={len(self._cache)}>"

    def pipeline_for(self, consumer: Any) -> Pipeline | None:
        cache = self._cache
        if consumer in cache:
            return cache[consumer]
        pipeline = self._build(consumer)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[consumer] = pipeline
        return pipeline
