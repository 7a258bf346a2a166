"""The batched policy under a burst on a starved event loop: a limit that cannot trip never answers
429. What it did before: after the sweeper gave back an idle key's reserve (STOCK zeroed), the next
slice was sized from a consumption of zero, so one unit for all the requests waiting on it; each
round grew the slice only by the rate those few units suggested, and the requests still waiting after
three rounds were denied ("slices kept going to concurrent requests") — 429s for a limit of a million
a second whenever Redis answers slowly (CPU starvation)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tollway.state.limits import BatchedRedisPolicy
from tollway.state.redis_backends import Standalone
from tollway.state.shared import SharedTable
from tollway.state.spec import Decision, LimitSpec

pytestmark = pytest.mark.integration
T0 = 1_000_000_020.0  # the start of a window


class SlowRedis:
    """The real backend, but each script call takes 50 ms of the policy's clock: a loaded machine."""

    def __init__(self, backend: Standalone, clock: list[float]) -> None:
        self.backend, self.clock = backend, clock

    async def script(self, *args: Any) -> Any:
        reply = await self.backend.script(*args)
        self.clock[0] += 0.05
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


async def resolve(result: object) -> Decision:
    return result if isinstance(result, Decision) else await result  # type: ignore[misc]


async def test_a_burst_after_an_idle_sweep_is_never_denied(
    redis_backend: Standalone, prefix: str, table: SharedTable
) -> None:
    clock = [T0 + 0.01]
    spec = LimitSpec("second", 1_000_000, 1)
    policy = BatchedRedisPolicy(
        spec,
        SlowRedis(redis_backend, clock),
        table=table,
        prefix=prefix,
        server_time=False,  # type: ignore[arg-type]
        clock=lambda: clock[0],
    )
    try:
        assert (await resolve(policy.check("k", clock[0]))).allowed  # the key's first slice
        policy.sweep(clock[0])  # remembers the reserve ...
        clock[0] += 0.1
        assert policy.sweep(clock[0]) > 0  # ... unchanged a sweep later: given back, STOCK zeroed
        decisions = await asyncio.gather(*(resolve(policy.check("k", clock[0])) for _ in range(64)))
        denied = [d for d in decisions if not d.allowed]
        assert not denied, f"{len(denied)} of 64 denied by a limit of 1,000,000/s"
    finally:
        await asyncio.gather(*policy.fetching.values(), return_exceptions=True)  # top-ups in flight
        policy.close()
