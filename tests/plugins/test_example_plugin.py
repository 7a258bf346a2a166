"""The example user plugin (examples/plugins/canary_tag.py), loaded by import path in a real gateway."""

from __future__ import annotations

import pytest
import yaml

from tests.support import ROOT, request
from tollway.examples.plugins.canary_tag import CanaryConfig, CanaryTag


def test_example_schema_and_phases():
    assert CanaryTag.phases == frozenset({"access"})
    assert CanaryTag.config_model is CanaryConfig
    with pytest.raises(ValueError):
        CanaryConfig(percent=101)


def test_example_in_process(harness):
    gw = harness(
        {
            "plugins": [
                {"name": "key-auth"},
                {"name": "tollway.examples.plugins.canary_tag:CanaryTag", "config": {"percent": 100}},
            ],
            "consumers": [{"username": "ann", "credentials": {"key-auth": [{"key": "ann-key"}]}}],
        }
    )
    result = gw.request("GET", "/", {"apikey": "ann-key", "X-Canary": "forged"})
    assert result.upstream.header_all("x-canary") == ["canary"]
    assert result.header("x-canary") == "canary"


@pytest.mark.integration
def test_example_config_through_a_real_gateway(gateway, backend):
    be = backend()
    config = yaml.safe_load((ROOT / "examples/plugins/canary.yaml").read_text())
    config["gateway"] = {"listen": ["127.0.0.1:0"], "status_listen": "127.0.0.1:0"}
    config["services"][0]["url"] = be.url
    gw = gateway(config)
    lanes = {}
    for key in ("alice-secret-key", "bob-secret-key"):
        for _ in range(3):
            resp = request(gw.port, "GET", "/users/1", headers={"apikey": key})
            assert resp.status == 200
            assert be.seen[-1].header("x-canary") == resp.header("x-canary")
            lanes.setdefault(key, set()).add(resp.header("x-canary"))
    assert all(len(lane) == 1 and lane <= {"canary", "stable"} for lane in lanes.values())  # sticky
    assert request(gw.port, "GET", "/users/1").status == 401
