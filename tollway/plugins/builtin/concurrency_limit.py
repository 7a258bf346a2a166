"""concurrency-limit: at most `limit` requests in flight per key on the node (all its workers together).

A request takes a slot in the access phase and gives it back when it ends, however it ends — response
sent, the gateway's own answer, the client gone (`RequestContext.on_finish`) — so WebSockets and long
downloads hold their slot for as long as they run. Over the limit: 429 with Retry-After: 1. Counts are
leased (docs/rate-limiting.md, "Concurrency"): a worker that dies cannot leave slots taken forever;
they vanish within two leases, while live workers renew theirs every lease/3.

Policies are kept per counter identity across config reloads, so requests admitted under the old
config release into the same count and one renewal timer serves each limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from tollway.config.types import Duration
from tollway.plugins.base import Plugin, PluginContext
from tollway.plugins.builtin.limiting import KeyBuilder, LimitPluginConfig, answers_for
from tollway.state.limits import LocalPolicy
from tollway.state.shared import node_table
from tollway.state.spec import Decision, LimitSpec

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext, Response


class ConcurrencyLimitConfig(LimitPluginConfig):
    limit: int = Field(ge=0, description="requests in flight at once per key on the node")
    name: str = Field(
        "concurrency",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:-]{0,63}$",
        description="the limit's name in headers",
    )
    lease: Duration = Field(
        30.0, ge=1, description="a dead worker's slots are freed within two leases (live workers renew)"
    )


class _Held:
    """One counter identity's policy in this worker, kept across reloads, with its renewal timer."""

    __slots__ = ("policy", "renewal")

    def __init__(self, policy: LocalPolicy) -> None:
        self.policy = policy
        self.renewal: Any = None


_POLICIES: dict[str, _Held] = {}  # LimitSpec.ident -> the worker's policy for it


def _policy_for(spec: LimitSpec) -> _Held:
    held = _POLICIES.get(spec.ident)
    table = node_table()
    if held is not None and held.policy.limit.table is not table:  # (tests install tables of their own)
        if held.renewal is not None:
            held.renewal.cancel()
        held = None
    if held is None or held.policy.spec != spec:
        policy = LocalPolicy(spec, table)
        if held is not None:  # same counters, new limit: keep what this worker holds, renew it here
            policy.limit.held = held.policy.limit.held  # type: ignore[attr-defined]
            if held.renewal is not None:
                held.renewal.cancel()
        held = _POLICIES[spec.ident] = _Held(policy)
    return held


class ConcurrencyLimit(Plugin[ConcurrencyLimitConfig]):
    name = "concurrency-limit"
    priority = 1100  # after rate-limiting: a request refused by a rate limit never takes a slot

    def __init__(self, config: ConcurrencyLimitConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        scope = config.scope or f"concurrency-limit@{context.attachment}"
        self.spec = LimitSpec(config.name, config.limit, config.lease, "concurrency", scope=scope)
        self._held = _policy_for(self.spec)
        self._keys = KeyBuilder(list(config.key), config.header_name)
        self._answers = answers_for(self.name, [self.spec], config)

    def access(self, ex: RequestContext) -> Response | None:
        held = self._held
        if held.renewal is None:  # first request of this limit in this worker: the loop is running
            held.renewal = held.policy.start_renewal(asyncio.get_running_loop())
        policy = held.policy
        key = self._keys.key(ex)
        decision = policy.check(key, time.time())
        assert isinstance(decision, Decision)  # a local policy never waits
        denied = self._answers.decided_one(ex, decision)
        if denied is None:
            ex.on_finish(lambda _ex: policy.release(key, time.time()))
        return denied
