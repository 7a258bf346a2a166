"""How the supervisor and workers hold a large config: parsed in a forked child (same config, same
errors), held without routes and consumers plus the pickled whole, with equal empty containers and
field sets shared (smaller, equal once unpickled)."""

from __future__ import annotations

import os
import pickle

import pytest

from tollway.config.apart import load_text_apart, run_apart
from tollway.config.compact import compact
from tollway.config.loader import load_text
from tollway.errors import ConfigError
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.runtime.config_hold import HeldConfig, unwire

ROUTES = 200


def config_text(routes: int = ROUTES) -> str:
    lines = ["services:", "  - {name: backend, url: 'http://127.0.0.1:9001'}", "routes:"]
    lines += [f"  - {{name: r{i}, service: backend, paths: ['/r{i}/']}}" for i in range(routes)]
    lines += ["consumers:"]
    lines += [f"  - {{username: u{i}, credentials: {{key-auth: [{{key: k{i}}}]}}}}" for i in range(routes)]
    lines += ["plugins:", "  - {name: key-auth}"]
    return "\n".join(lines) + "\n"


def test_a_config_parsed_apart_equals_one_parsed_here() -> None:
    text = config_text()
    assert load_text_apart(text, "gw.yaml", PLUGIN_CHECK) == load_text(text, "gw.yaml", PLUGIN_CHECK)


def test_errors_found_apart_are_the_same_errors() -> None:
    text = config_text(3) + "routes: []\n"  # a duplicate key
    with pytest.raises(ConfigError) as here:
        load_text(text, "gw.yaml", PLUGIN_CHECK)
    with pytest.raises(ConfigError) as apart:
        load_text_apart(text, "gw.yaml", PLUGIN_CHECK)
    assert apart.value.issues == here.value.issues and apart.value.source == "gw.yaml"


def test_work_that_crashes_apart_runs_here_and_raises_here() -> None:
    calls = []

    def work() -> int:
        calls.append(os.getpid())
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_apart(work)
    assert calls == [os.getpid()]  # the child's attempt is invisible here: only this one is recorded


def test_compact_shares_empty_containers_and_keeps_the_config_equal() -> None:
    config = load_text(config_text(), "gw.yaml", PLUGIN_CHECK)
    before = pickle.dumps(config)
    dumped = config.model_dump()
    compact(config)
    assert config.model_dump() == dumped
    assert config.routes[0].hosts is config.routes[1].hosts == []
    assert config.routes[0].__pydantic_fields_set__ is config.routes[1].__pydantic_fields_set__
    after = pickle.dumps(config)
    assert len(after) < len(before)
    again = pickle.loads(after)
    assert again == config and again.routes[0].methods is again.routes[1].methods


def test_a_held_file_config_keeps_no_routes_or_consumers_but_sends_them_whole() -> None:
    config = load_text(config_text(), "gw.yaml", PLUGIN_CHECK)
    dumped = config.model_dump()
    held = HeldConfig.hold(config, whole=False)
    assert held.config.routes == [] and held.config.consumers == []
    assert (held.routes, held.services) == (ROUTES, 1)
    assert held.config.gateway == config.gateway and held.config.services == config.services
    kind, version, data = held.message(7)
    assert (kind, version) == ("config_wire", 7)
    assert unwire(data).model_dump() == dumped
    assert held.whole().model_dump() == dumped


def test_a_store_config_is_held_whole() -> None:
    config = load_text(config_text(5), "gw.yaml", PLUGIN_CHECK)
    held = HeldConfig.hold(config, whole=True)
    assert held.config is config and held.wire is None
    assert held.message(2) == ("config", 2, config)
