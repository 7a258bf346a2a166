"""The limit plugins' answers (tollway.plugins.builtin.limit_check.LimitAnswers): the RateLimit fields a
single-limit plugin joins from bytes per request are exactly what the header module formats."""

from __future__ import annotations

import pytest

from tollway.plugins.builtin.limit_check import LimitAnswers
from tollway.proxy.exchange import Exchange
from tollway.proxy.server import ClientConnection
from tollway.state.headers import ratelimit, ratelimit_policy
from tollway.state.spec import Decision, LimitSpec


def fields_for(
    client: ClientConnection, answers: LimitAnswers, decision: Decision
) -> list[tuple[bytes, bytes]]:
    ex = Exchange(client, client.worker.snapshot)
    assert answers.decided_one(ex, decision) is None
    return ex.added_response_fields()


@pytest.mark.parametrize("remaining", [0, 1, 42, 999, 1000, 1001, 123_456, 10**12, -3])
@pytest.mark.parametrize("reset_after", [0.0, 0.2, 16.2, 59.999999, 60.0, 999.5, 86_400.0, 1e9])
def test_single_limit_fields_match_the_formatted_ones(
    client: ClientConnection, remaining: int, reset_after: float
) -> None:
    spec = LimitSpec('per "user"', 10**13, 60)
    decision = Decision(True, spec.limit, remaining, reset_after, 0.0, spec)
    expected = [
        (b"RateLimit-Policy", ratelimit_policy([spec]).encode("latin-1")),
        (b"RateLimit", ratelimit([decision]).encode("latin-1")),
    ]
    assert fields_for(client, LimitAnswers("rate-limiting", [spec]), decision) == expected


def test_a_decision_of_another_spec_is_formatted_the_general_way(client: ClientConnection) -> None:
    minute, other = LimitSpec("minute", 100, 60), LimitSpec("second", 5, 1)
    decision = Decision(True, 5, 4, 0.5, 0.0, other)
    fields = fields_for(client, LimitAnswers("rate-limiting", [minute]), decision)
    assert fields[1] == (b"RateLimit", b'"second";r=4;t=1')


def test_a_concurrency_limit_has_no_reset_in_its_item(client: ClientConnection) -> None:
    spec = LimitSpec("inflight", 10, 30, "concurrency")
    fields = fields_for(client, LimitAnswers("rate-limiting", [spec]), Decision(True, 10, 3, 0.0, 0.0, spec))
    assert fields[1] == (b"RateLimit", b'"inflight";r=3')
