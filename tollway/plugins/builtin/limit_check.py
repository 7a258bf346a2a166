"""The per-request half of the limit plugins, compiled with mypyc (HOT_MODULES in setup.py): the key a
request is counted under (`KeyBuilder`), the rate-limiting check (`RateCheck`) and what becomes of its
decisions (`LimitAnswers`). Everything here is built once per config; per request it runs as native
calls with no list, closure or generator on the common path (one limit, allowed).

The plugins' options (pydantic models) stay in `limiting` and `rate_limiting`, which are interpreted:
run there, the same per-request code cost ~10,000 interpreted instructions (docs/development.md, "The
local rate limit's cost").

Keys. A limit counts per key, built from parts of the request — `consumer`, `credential`, `ip`,
`header`, `path`, `route`, `service` — joined when several are named (`[consumer, route]`: each consumer
per route). A part the request does not have (no consumer on an anonymous request, no such header)
falls back to the client IP, as Kong does: one shared bucket for every anonymous client would let one
of them lock out all the others. The client IP is the real one (`real_client_ip`: through trusted
proxies only).
"""

from __future__ import annotations

from collections.abc import Awaitable
from time import time
from typing import TYPE_CHECKING, Any, Final

from tollway.counters import metrics
from tollway.proxy.forwarded import real_client_ip
from tollway.proxy.pdk import Response
from tollway.state import headers as rl_headers
from tollway.state.limits import LocalPolicy, Policy, check_all
from tollway.state.spec import Decision, LimitSpec

if TYPE_CHECKING:
    from tollway.counters.metrics import Counter
    from tollway.proxy.pdk import RequestContext

KEY_PARTS: Final = ("consumer", "credential", "ip", "header", "path", "route", "service")
_CONSUMER: Final = 0
_CREDENTIAL: Final = 1
_IP: Final = 2
_HEADER: Final = 3
_PATH: Final = 4
_ROUTE: Final = 5
_SERVICE: Final = 6
_CACHE_LIMIT: Final = 4096


class KeyBuilder:
    """Builds a request's limit key from the configured parts (chosen once per config)."""

    def __init__(self, parts: list[str], header_name: str | None) -> None:
        self._header = header_name or ""
        self._credentials: dict[int, tuple[Any, str]] = {}
        self._parts = [KEY_PARTS.index(part) for part in dict.fromkeys(parts)]
        self._single = self._parts[0] if len(self._parts) == 1 else -1

    def __repr__(self) -> str:
        return f"<KeyBuilder {len(self._parts)} parts>"

    def key(self, ex: RequestContext) -> str:
        single = self._single
        if single >= 0:
            return self.part(ex, single)
        return "|".join([self.part(ex, part) for part in self._parts])

    def part(self, ex: RequestContext, part: int) -> str:
        # An if-chain on an int rather than a tuple of getters: each branch is a native call.
        if part == _CONSUMER:
            consumer = ex.consumer
            if consumer is None:
                return "ip:" + real_client_ip(ex)
            cid: str = consumer.id
            return "consumer:" + cid
        if part == _CREDENTIAL:
            return self._credential(ex)
        if part == _IP:
            return real_client_ip(ex)
        if part == _HEADER:
            value = ex.get_header(self._header)
            if value is None:
                return "ip:" + real_client_ip(ex)
            return "header:" + value
        if part == _PATH:
            return ex.path
        route: Any = ex.route if part == _ROUTE else ex.service
        if route is None:
            return ""
        name: str = route.name
        return name

    def _credential(self, ex: RequestContext) -> str:
        credential = ex.credential
        if credential is None:
            return "ip:" + real_client_ip(ex)
        # Credentials live as long as the config version, like this builder: id() is stable for them.
        cached = self._credentials.get(id(credential))
        if cached is None or cached[0] is not credential:
            identity = getattr(credential, "identity", None)
            text = str(identity()) if identity is not None else repr(credential)
            if len(self._credentials) >= _CACHE_LIMIT:
                self._credentials.clear()
            cached = self._credentials[id(credential)] = (credential, "credential:" + text)
        return cached[1]


# Decimal digits of the small numbers most RateLimit `r` and `t` values are, made once (1,000 short bytes
# objects, ~37 KB): formatting an int costs a few hundred instructions per request.
_SMALL: Final = 1000
_DECIMALS: Final = [b"%d" % number for number in range(_SMALL)]


def _decimal(number: int) -> bytes:
    """A non-negative int's decimal digits."""
    if number < _SMALL:
        return _DECIMALS[number]
    return str(number).encode("ascii")  # (compiled, a native int-to-str; bytes % would parse a format)


class LimitAnswers:
    """What a limit plugin does with its decisions, built once per config: the RateLimit headers on
    every response, the 429 (or the configured status; 503 when a limit could not be checked), and
    tollway_rate_limit_decisions_total{plugin, route, decision} — a counter handle per (decision, route),
    made on first use (routes are bounded by the config)."""

    def __init__(
        self,
        plugin: str,
        specs: list[LimitSpec],
        ietf: bool = True,
        legacy: bool = False,
        per_limit: bool = False,
        status: int = 429,
        message: str = "rate limit exceeded",
    ) -> None:
        self._plugin = plugin
        self._status, self._message = status, message
        self._ietf, self._legacy, self._per_limit = ietf, legacy, per_limit
        self._policy_field = (b"RateLimit-Policy", rl_headers.ratelimit_policy(specs).encode("latin-1"))
        # The one spec of a single-limit plugin, and both of its fields up to the RateLimit item's first
        # number (`RateLimit-Policy: …\r\nRateLimit: "minute";r=`), as header lines: an allowed request's
        # fields are then joined from bytes (`add_response_lines`), not formatted (`decided`).
        one = specs[0] if len(specs) == 1 and specs[0].algorithm != "concurrency" else None
        self._one_spec = one
        item_start = (rl_headers.sf_string(one.name) + ";r=").encode("latin-1") if one else b""
        self._lines_start = b"RateLimit-Policy: " + self._policy_field[1] + b"\r\nRateLimit: " + item_start
        self._handles: dict[str, dict[str, Counter]] = {}  # decision -> route -> handle
        self._allowed: dict[str, Counter] = {}  # route -> the "allowed" handle (the common case)

    def __repr__(self) -> str:
        return f"<LimitAnswers {self._plugin}>"

    def decided(self, ex: RequestContext, decisions: list[Decision]) -> Response | None:
        """Headers for this request's response; the denial if any limit denied, else None."""
        if self._ietf:
            value = rl_headers.ratelimit(decisions).encode("latin-1")
            ex.add_response_fields([self._policy_field, (b"RateLimit", value)])
        if self._legacy:
            ex.add_response_fields(rl_headers.legacy_headers(decisions, self._per_limit))
        for decision in decisions:
            if not decision.allowed:
                return self._deny(ex, decisions)
        self.count_allowed(ex)
        return None

    def decided_one(self, ex: RequestContext, decision: Decision) -> Response | None:
        """`decided` for a plugin with one limit: the same headers, without a list per request."""
        if not decision.allowed or self._legacy or decision.spec is not self._one_spec:
            return self.decided(ex, [decision])
        if self._ietf:
            remaining = decision.remaining if decision.remaining > 0 else 0
            seconds = rl_headers.whole_seconds(decision.reset_after)
            lines = [self._lines_start, _decimal(remaining), b";t=", _decimal(seconds), b"\r\n"]
            ex.add_response_lines(b"".join(lines))
        self.count_allowed(ex)
        return None

    def _deny(self, ex: RequestContext, decisions: list[Decision]) -> Response:
        rid = ex.request_id.decode("latin-1")
        status, body = rl_headers.denial_body(decisions, rid, self._status, self._message)
        self.count(ex, "error" if any(d.unavailable for d in decisions if not d.allowed) else "limited")
        headers = [(b"Content-Type", b"application/json"), (b"X-Request-Id", ex.request_id)]
        headers.append((b"Retry-After", rl_headers.retry_after(decisions).encode("latin-1")))
        return Response(status, body, headers)

    def count_allowed(self, ex: RequestContext) -> None:
        route = ex.route.name if ex.route is not None else ""
        handle = self._allowed.get(route)
        if handle is None:
            handle = self._allowed[route] = self._handle("allowed", route)
        handle.value += 1

    def count(self, ex: RequestContext, decision: str) -> None:
        route = ex.route.name if ex.route is not None else ""
        self._handle(decision, route).value += 1

    def _handle(self, decision: str, route: str) -> Counter:
        handles = self._handles.get(decision)
        if handles is None:
            handles = self._handles[decision] = {}
        handle = handles.get(route)
        if handle is None:
            handle = handles[route] = metrics.counter(
                "rate_limit_decisions_total", plugin=self._plugin, route=route, decision=decision
            )
        return handle


class RateCheck:
    """rate-limiting's `access` hook: the key, the policies' check, the answers. With one local limit
    (the common case) the check is one native call and nothing waits."""

    def __init__(self, policies: list[Policy], keys: KeyBuilder, cost: int, answers: LimitAnswers) -> None:
        self.policies = policies
        self._keys = keys
        self._cost = cost
        self._answers = answers
        one = policies[0] if len(policies) == 1 else None
        self._local: LocalPolicy | None = one if isinstance(one, LocalPolicy) else None
        self._single: Policy | None = one

    def access(self, ex: RequestContext) -> Response | Awaitable[Response | None] | None:
        key = self._keys.key(ex)
        local = self._local
        if local is not None:
            decision = local.check(key, time(), self._cost)
            if isinstance(decision, Decision):  # always, for a local policy
                return self._answers.decided_one(ex, decision)
            return self._decided_later(ex, _as_list(decision))
        single = self._single
        if single is not None:  # one limit: no list to check all-or-nothing
            one = single.check(key, time(), self._cost)
            if isinstance(one, Decision):
                return self._answers.decided_one(ex, one)
            return self._decided_later(ex, _as_list(one))
        result = check_all(self.policies, key, time(), self._cost)
        if isinstance(result, list):
            return self._answers.decided(ex, result)
        return self._decided_later(ex, result)

    async def _decided_later(self, ex: RequestContext, pending: Awaitable[list[Decision]]) -> Response | None:
        return self._answers.decided(ex, await pending)


async def _as_list(pending: Awaitable[Decision]) -> list[Decision]:
    return [await pending]
