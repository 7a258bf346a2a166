"""Runs a route's plugin hooks, phase by phase, on an exchange.

Phases, in order (Kong's and APISIX's vocabulary):
  rewrite  — before anything else; may change the request (path, headers)
  access   — authentication, authorization, limits; may answer instead of the backend
  response — the backend's response head has arrived; may change its headers (synchronous)
  log      — the response is sent; record, count, export (synchronous; queue slow work)

A hook is a plain callable taking the exchange (the request context). In `rewrite` and `access` it
returns None to go on, a `Response` to answer now, or an awaitable (when it must wait for I/O: a Redis
counter, a JWKS fetch) whose result is either of those. Only then is a task created, so a chain of
hooks that need no I/O costs no coroutine switch. A hook that raises gets its request a 500 with the
request id, and the traceback in the log; the worker lives on.

The hook lists are built once per config version (by `tollway.plugins.build`); nothing here
allocates per request unless a hook awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tollway.proxy.responses import Response

if TYPE_CHECKING:
    from tollway.proxy.exchange import Exchange

Hook = Callable[["Exchange"], Any]


class Pipeline:
    __slots__ = ("access", "has_log", "has_response", "log", "name", "request", "response", "rewrite")

    def __init__(
        self,
        rewrite: tuple[Hook, ...] = (),
        access: tuple[Hook, ...] = (),
        response: tuple[Hook, ...] = (),
        log: tuple[Hook, ...] = (),
        name: str = "",
    ) -> None:
        self.name = name
        self.rewrite = rewrite
        self.access = access
        self.request: tuple[Hook, ...] = rewrite + access
        self.response = response
        self.log = log
        self.has_response = bool(response)
        self.has_log = bool(log)

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
                ex.fail(exc)
                return
            if result is None:
                continue
            if isinstance(result, Response):
                ex.respond(result)
                return
            if ex.done:
                return
            asyncio.get_running_loop().create_task(self._await_hook(ex, result, index + 1))
            return
        ex.proceed()

    async def _await_hook(self, ex: Exchange, pending: Awaitable[Any], next_index: int) -> None:
        try:
            result = await pending
        except Exception as exc:
            ex.fail(exc)
            return
        if ex.done:
            return  # the client left while the hook waited
        if isinstance(result, Response):
            ex.respond(result)
            return
        self.continue_request(ex, next_index)

    def run_response(self, ex: Exchange) -> Exception | None:
        """Response hooks; an exception is returned (the exchange answers 500 instead)."""
        for hook in self.response:
            try:
                hook(ex)
            except Exception as exc:
                return exc
        return None

    def run_log(self, ex: Exchange) -> None:
        for hook in self.log:
            try:
                hook(ex)
            except Exception as exc:
                ex.client.worker.log_exception("a log hook failed", exc, ex)
