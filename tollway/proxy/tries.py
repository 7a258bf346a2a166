"""The try/retry/replay state machine of one request: which target, which upstream connection, and
what happens when a try fails.

A try picks a target of the service's cluster, takes an idle pooled connection or opens one, and hands
it to the exchange to send the request (`Exchange._send`). When the try fails before its response
reaches the client, the request is either replayed once on a fresh connection to the same target (a
stale pooled connection: nothing reached the backend) or retried on another target, as the upstream's
retry policy allows (docs/upstreams.md): attempts, which failures, idempotent methods only once the
request was sent, the retry budget, a backoff. The request body is kept for a replay up to the policy's
`replay_limit`.

`UpstreamTries` is a base class of `Exchange` rather than an object of its own, so a request costs no
extra allocation; it only touches the fields declared here and those of the request context.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

from tollway.errors import CircuitBreakerOpen, UpstreamConnectError, UpstreamError, UpstreamTimeout
from tollway.protocol.request import REQ_NONE
from tollway.proxy.pdk import RequestContext
from tollway.upstream.retry import ON_ERROR, ON_TIMEOUT
from tollway.upstream.target import FAILED, NEUTRAL

_perf_counter: Final = time.perf_counter  # bound once: no module attribute lookup per request

if TYPE_CHECKING:
    from tollway.proxy.server import ClientConnection
    from tollway.proxy.snapshot import Snapshot
    from tollway.upstream.connection import UpstreamConnection
    from tollway.upstream.target import Target

# How much request body is kept for a replay when no upstream says (a request not yet routed).
REPLAY_LIMIT: Final = 65536
# Methods retried after the request was sent (RFC 9110 9.2.2); others only if the route allows.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class UpstreamTries(RequestContext):
    __slots__ = (
        "_body_buf",
        "_body_buffered",
        "_connect_task",
        "_held",
        "_outcome",
        "_replay",
        "_retried",
        "_retry_timer",
        "_tried",
        "retries",
        "target",
        "upstream",
        "upstream_start",
    )

    def __init__(self, client: ClientConnection, snapshot: Snapshot) -> None:
        super().__init__(client, snapshot)
        self.target: Target | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_start = 0.0
        self._body_buf: list[bytes] = []  # request body waiting for an upstream connection
        self._body_buffered = 0
        self._replay: list[bytes] | None = []  # the request body so far, for a replay (None: too big)
        self._retried = False  # the one replay after a stale pooled connection is used
        self.retries = 0  # retries on other targets (upstream retry policy)
        self._tried: list[Target] | None = None  # targets of earlier tries, once there is a retry
        self._held = False  # `target` was picked and not yet released to its cluster
        self._outcome = NEUTRAL  # how the current try is going, for passive health (upstream.target)
        self._retry_timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None

    # -- what the exchange provides -------------------------------------------------------------------
    def _send(self, conn: UpstreamConnection) -> None:
        """Write the request on `conn` (a try's connection is ready)."""
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        """Answer the client with the error (no try is left)."""
        raise NotImplementedError

    def _forwarding(self) -> bool:
        return self.upstream is not None

    # -- tries -------------------------------------------------------------------------------------------
    def _connect(self, target: Target) -> None:
        """Start a try on `target`: a pooled connection if one is idle, else a new one."""
        self.upstream_start = _perf_counter()
        self._outcome = NEUTRAL
        conn = None if self.upgrade else target.pool.acquire()
        if conn is not None:
            self._send(conn)
        else:
            self._open_connection(target)

    def _open_connection(self, target: Target) -> None:
        service = self.service
        assert service is not None
        breaker = service.cluster.breaker
        if breaker is not None:
            limit = breaker.admit(service.cluster.pools, target.pool)
            if limit:
                self.fail(CircuitBreakerOpen(_breaker_message(service.cluster.name, limit), limit))
                return
            breaker.pending += 1
        task = asyncio.get_running_loop().create_task(target.pool.open(service.connect_timeout))
        self._connect_task = task
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self._connect_task = None
        service = self.service
        if service is not None and service.cluster.breaker is not None:
            service.cluster.breaker.pending -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._try_failed(exc if isinstance(exc, UpstreamError) else UpstreamError(str(exc)), False)
            return
        conn = task.result()
        if self.done:  # the client went away while we connected: keep the fresh connection warm
            conn.pool.release(conn)
            return
        self._send(conn)

    def upstream_failed(self, error: UpstreamError, replayable: bool) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.pool.detach(conn)
        if replayable and not self._retried and not self.response_started and self._replay_allowed():
            # A stale pooled connection (closed by the backend as we reused it, without one byte of
            # answer): once more on a fresh connection to the same target. The backend may still have
            # run the request, so only what is safe to repeat (docs/upstreams.md).
            self._retried = True
            self._body_buf = list(self._replay or ())
            target = self.target
            assert target is not None
            self._open_connection(target)
            return
        self._try_failed(error, True)

    def _try_failed(self, error: UpstreamError, sent: bool) -> None:
        """A try failed before its response reached the client: retry elsewhere, or answer the error."""
        if self.done:
            return
        self._outcome = FAILED
        if not self._retry(error, sent):
            self.fail(error)

    def _retry(self, error: UpstreamError, sent: bool) -> bool:
        service = self.service
        if service is None or self.response_head is not None or self.response_started:
            return False
        policy = service.cluster.retry
        if self.retries >= policy.attempts:
            return False
        if not policy.on & (ON_TIMEOUT if isinstance(error, UpstreamTimeout) else ON_ERROR):
            return False
        if sent and not self._idempotent():
            return False
        # A refused connection put no load on any backend: retrying it costs the budget nothing.
        free = not sent and isinstance(error, UpstreamConnectError)
        return self._can_replay() and self._retry_elsewhere(FAILED, free)

    def _retry_status(self) -> bool:
        """The response head carries a status the policy retries; it has not reached the client."""
        service = self.service
        assert service is not None
        if self.retries >= service.cluster.retry.attempts or not self._idempotent() or not self._can_replay():
            return False
        conn = self.upstream
        if conn is None:
            return False
        self.upstream = None
        if not self._retry_elsewhere(self._outcome, False):
            self.upstream = conn  # no retry after all: this response goes to the client
            return False
        conn.pool.discard(conn)  # the rest of that response is not wanted
        return True

    def _retry_elsewhere(self, outcome: int, free: bool) -> bool:
        """Release the target that failed and start the next try on another one, after a backoff.
        Unless `free`, the retry budget must allow it."""
        service = self.service
        failed = self.target
        assert service is not None and failed is not None
        cluster = service.cluster
        upstream = cluster.upstream
        tried = self._tried
        if tried is None:
            tried = self._tried = [failed]
        else:
            tried.append(failed)
        self._release_target(outcome)
        target = cluster.pick_retry(self, tried)
        if target is None:
            return False
        if not free and not upstream.budget.withdraw():
            upstream.retries_refused += 1
            cluster.release(target, self, NEUTRAL, -1.0)
            return False
        upstream.retries += 1
        self.retries += 1
        self.target = target
        self._held = True
        self._outcome = NEUTRAL
        self.upstream_time = -1.0
        self._body_buf = list(self._replay or ())
        self._body_buffered = 0
        delay = cluster.retry.backoff(self.retries)
        if delay > 0:
            self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_now)
        else:
            self._retry_now()
        return True

    def _retry_now(self) -> None:
        self._retry_timer = None
        target = self.target
        if self.done or target is None:
            return
        self._connect(target)

    def _idempotent(self) -> bool:
        if self.method in _IDEMPOTENT:
            return True
        route = self.route
        return route is not None and route.retry_non_idempotent

    def _release_target(self, outcome: int) -> None:
        target = self.target
        service = self.service
        if self._held and target is not None and service is not None:
            self._held = False
            service.cluster.release(target, self, outcome, self.upstream_time)

    def _replay_allowed(self) -> bool:
        if not self._can_replay():
            return False
        if self._idempotent():
            return True
        service = self.service
        return service is not None and service.replay_non_idempotent

    def _can_replay(self) -> bool:
        if self.body_kind == REQ_NONE:
            return True
        return self.body_done and self._replay is not None

    def _release_upstream_on_error(self) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.pool.discard(conn)


def _breaker_message(upstream: str, limit: str) -> str:
    if limit == "max-connections":
        return f"upstream {upstream!r} is at its connection limit (circuit breaker: max_connections)"
    return (
        f"upstream {upstream!r} has too many requests waiting for a connection "
        "(circuit breaker: max_pending_requests)"
    )
