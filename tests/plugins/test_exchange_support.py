"""The exchange's plugin surface: header helpers refuse injection, query rewriting, response headers."""

from __future__ import annotations

import pytest

from tollway.plugins import Exchange, Plugin, PluginConfig
from tollway.proxy.pdk import header_field


class InjectConfig(PluginConfig):
    value: str = ""
    query: str | None = None


class Inject(Plugin[InjectConfig]):
    """Passes request data into headers the way a careless plugin would."""

    name = "inject"
    priority = 1000

    def access(self, ex: Exchange) -> None:
        ex.set_header("X-From-Client", ex.get_header("x-raw") or self.config.value)
        if self.config.query is not None:
            ex.set_query(self.config.query)
        ex.add_response_header("X-Echo", self.config.value or "v")


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "nul\x00", "del\x7f"])
def test_header_field_refuses_control_characters(value):
    with pytest.raises(ValueError):
        header_field("X-A", value)


@pytest.mark.parametrize("name", ["X A", "X:A", "", "X\r\nB", "é"])
def test_header_field_refuses_bad_names(name):
    with pytest.raises(ValueError):
        header_field(name, "v")


def test_header_field_keeps_latin1_and_encodes_other_text_as_utf8():
    assert header_field("X-A", " café\t") == (b"X-A", "café".encode("latin-1"))
    assert header_field("X-A", "名前") == (b"X-A", "名前".encode())


def test_a_plugin_cannot_inject_headers_by_mistake(harness):
    gw = harness(
        {
            "plugins": [
                {"name": "tests.plugins.test_exchange_support:Inject", "config": {"value": "x\r\nX-Evil: 1"}}
            ]
        }
    )
    result = gw.request()
    assert result.status == 500
    assert result.upstream is None
    assert b"X-Evil" not in result.raw


def test_set_query_and_response_headers(harness):
    gw = harness(
        {
            "plugins": [
                {
                    "name": "tests.plugins.test_exchange_support:Inject",
                    "config": {"value": "ok", "query": "a=1&b=%20"},
                }
            ]
        }
    )
    result = gw.request("GET", "/p?old=1")
    assert result.upstream.target == "/p?a=1&b=%20"
    assert result.upstream.header("x-from-client") == "ok"
    assert result.header("x-echo") == "ok"
    bad = harness(
        {
            "plugins": [
                {
                    "name": "tests.plugins.test_exchange_support:Inject",
                    "config": {"value": "ok", "query": "a=1 HTTP/1.1\r\n"},
                }
            ]
        }
    )
    assert bad.request("GET", "/p").status == 500
