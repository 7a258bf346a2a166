"""rate-limiting: several limits at once (per second, minute, hour, day or any window), counted per key,
node-exact (`local`), cluster-wide on Redis (`redis`), or cluster-wide with quota taken in slices
(`batched`) — docs/plugins/rate-limiting.md for the options, docs/rate-limiting.md for the accuracy of
each policy and what happens when Redis fails.

The counting is `tollway.state`; this plugin chooses the key, builds the policies once per config, and
turns decisions into headers and answers: RateLimit / RateLimit-Policy (IETF draft) on every response,
optionally X-RateLimit-*, and 429 with Retry-After and a JSON body when a limit is reached (503 when a
fail-closed limit cannot reach Redis). Counters live outside the plugin object, keyed by where the
instance is attached and the limit's name, window and algorithm, so a config reload keeps the counts.

Cost per request (`local`, one limit): the key, one shared-table check (~1 µs), the headers, all in the
compiled `limit_check.RateCheck` (the pipeline calls its `access` directly); no
coroutine. `redis` awaits one script per request; `batched` awaits only when its node reserve is empty.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tollway.config.types import Duration
from tollway.plugins.base import Plugin, PluginConfig, PluginContext
from tollway.plugins.builtin.limit_check import RateCheck
from tollway.plugins.builtin.limiting import KeyBuilder, LimitPluginConfig, answers_for
from tollway.state.limits import Policy, build_policy
from tollway.state.redis_backends import backend_for
from tollway.state.spec import LimitSpec

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext, Response

Algorithm = Literal["fixed", "sliding", "gcra"]
_LIMIT_NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._:-]{0,63}$"
_SHORTHANDS = (("second", 1.0), ("minute", 60.0), ("hour", 3600.0), ("day", 86400.0))
_REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster", "rediss+cluster")


class LimitConfig(PluginConfig):
    limit: int = Field(ge=0, description="units admitted per window (0: every request is refused)")
    window: Duration = Field(gt=0, description='the window, e.g. 1, "90s", "1h", "1d"')
    name: str | None = Field(
        None,
        pattern=_LIMIT_NAME,
        description="the limit's name in the RateLimit headers and 429 bodies (default: second, minute, "
        'hour or day for those windows, else e.g. "90s")',
    )
    algorithm: Algorithm | None = Field(None, description="fixed, sliding or gcra (default: the plugin's)")
    burst: int = Field(0, ge=0, description="gcra only: units a client may spend at once (default: limit)")


class RedisSettings(PluginConfig):
    url: str = Field(
        description="redis://[user:password@]host[:port][/db], "
        "redis+sentinel://s1:26379,s2:26379/service[/db] or redis+cluster://n1:7000,n2:7000; "
        "rediss:// and rediss+cluster:// speak TLS"
    )
    timeout: Duration = Field(0.25, gt=0, description="longest wait for a reply before Redis counts as down")
    connect_timeout: Duration = Field(0.25, gt=0, description="longest wait for a connection")
    prefix: str = Field("tw:", pattern=r"^[A-Za-z0-9:_.-]{0,32}$", description="prefix of every key")

    @model_validator(mode="after")
    def _url(self) -> RedisSettings:
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in _REDIS_SCHEMES:
            raise ValueError(f"redis.url must start with {', '.join(s + '://' for s in _REDIS_SCHEMES)}")
        if not rest.rpartition("@")[2].partition("/")[0]:
            raise ValueError("redis.url names no host")
        return self


class BatchSettings(PluginConfig):
    slice_interval: Duration | None = Field(
        None,
        gt=0,
        description="how long a slice should last at the node's rate (default: min(1s, window/10))",
    )
    max_slice: int | None = Field(None, ge=1, description="largest slice taken at once (default: limit/10)")


class RateLimitingConfig(LimitPluginConfig):
    second: int | None = Field(None, ge=0, description="shorthand: this many requests per second")
    minute: int | None = Field(None, ge=0, description="shorthand: this many requests per minute")
    hour: int | None = Field(None, ge=0, description="shorthand: this many requests per hour")
    day: int | None = Field(None, ge=0, description="shorthand: this many requests per day")
    limits: list[LimitConfig] = Field(default_factory=list, description="limits with any window")
    algorithm: Algorithm = Field("fixed", description="fixed, sliding or gcra: for limits that name none")
    policy: Literal["local", "redis", "batched"] = Field(
        "local",
        description="local: one exact count per node (all workers); redis: exact across nodes, a round "
        "trip per request; batched: Redis quota taken in slices, most requests without a round trip",
    )
    redis: RedisSettings | None = Field(None, description="the Redis of the redis and batched policies")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="batched policy tuning")
    on_failure: Literal["open", "closed"] = Field(
        "open",
        description="when Redis is unreachable: open (node-local limits decide) or closed (503)",
    )
    cost: int = Field(1, ge=1, description="units each request counts")

    @model_validator(mode="after")
    def _consistent(self) -> RateLimitingConfig:
        specs = self.limit_specs("")
        if not specs:
            raise ValueError("no limit: set second, minute, hour, day or limits")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique; repeated: {', '.join(duplicates)}")
        if self.policy != "local" and self.redis is None:
            raise ValueError(f"policy {self.policy!r} needs `redis: {{url: ...}}`")
        return self

    def limit_specs(self, scope: str) -> list[LimitSpec]:
        specs = [
            LimitSpec(name, count, window, self.algorithm, scope=scope)
            for name, window in _SHORTHANDS
            if (count := getattr(self, name)) is not None
        ]
        for item in self.limits:
            name = item.name or _window_name(item.window)
            algorithm = item.algorithm or self.algorithm
            specs.append(LimitSpec(name, item.limit, item.window, algorithm, item.burst, scope))
        return specs


class RateLimiting(Plugin[RateLimitingConfig]):
    name = "rate-limiting"
    priority = 1200  # limits band: after authentication (the consumer is known), before transformations

    def __init__(self, config: RateLimitingConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        scope = config.scope or f"rate-limiting@{context.attachment}"
        self.specs = config.limit_specs(scope)
        self.policies: list[Policy] = [self._policy(spec) for spec in self.specs]
        keys = KeyBuilder(list(config.key), config.header_name)
        self._check = RateCheck(self.policies, keys, config.cost, answers_for(self.name, self.specs, config))

    def hook(self, phase: str) -> Callable[[RequestContext], Any]:
        # The pipeline calls the compiled check's own method, so a request runs no interpreted frame of
        # this plugin (the class's `access` below says the same, slower).
        return self._check.access if phase == "access" else super().hook(phase)

    def _policy(self, spec: LimitSpec) -> Policy:
        config = self.config
        if config.policy == "local" or config.redis is None:
            return build_policy(spec, "local")
        redis = config.redis
        backend = backend_for(redis.url, timeout=redis.timeout, connect_timeout=redis.connect_timeout)
        if config.policy == "redis":
            return build_policy(spec, "redis", backend, on_failure=config.on_failure, prefix=redis.prefix)
        return build_policy(
            spec,
            "batched",
            backend,
            on_failure=config.on_failure,
            prefix=redis.prefix,
            slice_interval=config.batch.slice_interval,
            max_slice=config.batch.max_slice,
        )

    def access(self, ex: RequestContext) -> Response | Awaitable[Response | None] | None:
        return self._check.access(ex)


def _window_name(window: float) -> str:
    for name, seconds in _SHORTHANDS:
        if window == seconds:
            return name
    return f"{window:g}s"
