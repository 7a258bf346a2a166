"""The plugin pipeline: order, scoping and precedence, consumer re-evaluation, failures, the registry."""

from __future__ import annotations

from typing import Any

import pytest

from tests.plugins import sample_plugins
from tests.support import gateway_config, request
from tollway.config.loader import load_text, validate
from tollway.errors import ConfigError
from tollway.plugins import registry
from tollway.plugins.base import Plugin
from tollway.plugins.registry import PLUGIN_CHECK

S = "tests.plugins.sample_plugins:"
CONSUMERS = [
    {"username": "alice", "credentials": {"key-auth": [{"key": "alice-key"}]}},
    {"username": "bob", "credentials": {"key-auth": [{"key": "bob-key"}]}},
]


def trace(result: Any) -> list[str]:
    assert result.upstream is not None, result.response
    return result.upstream.header_all("x-trace")


def issues(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(config, source="gw.yaml", plugins=PLUGIN_CHECK)
    return info.value.issues


# -- order ------------------------------------------------------------------------------------------------
def test_hooks_run_by_priority_bands(harness):
    gw = harness({"plugins": [{"name": S + "TagLow"}, {"name": S + "TagHigh"}, {"name": S + "TagMid"}]})
    assert trace(gw.request()) == ["tag-high:x", "tag-mid:x", "tag-low:x"]


def test_rewrite_phase_runs_before_every_access_hook(harness):
    gw = harness({"plugins": [{"name": S + "TagHigh"}, {"name": S + "TagRewrite"}]})
    assert trace(gw.request()) == ["tag-rewrite:x", "tag-high:x"]


def test_route_plugin_order_runs_listed_plugins_first(harness):
    routes = [{"name": "r", "service": "backend", "paths": ["/"], "plugin_order": [S + "TagLow", "tag-high"]}]
    gw = harness(
        {
            "routes": routes,
            "plugins": [{"name": S + "TagLow"}, {"name": S + "TagHigh"}, {"name": S + "TagMid"}],
        }
    )
    assert trace(gw.request()) == ["tag-low:x", "tag-high:x", "tag-mid:x"]


def test_routes_with_the_same_plugins_share_one_pipeline(harness):
    routes = [{"name": f"r{i}", "service": "backend", "paths": [f"/r{i}"]} for i in range(3)]
    routes.append(
        {"name": "other", "service": "backend", "paths": ["/other"], "plugins": [{"name": S + "TagLow"}]}
    )
    gw = harness({"routes": routes, "plugins": [{"name": S + "TagMid"}]})
    pipelines = [r.pipeline for r in gw.worker.snapshot.routes]
    assert pipelines[0] is pipelines[1] is pipelines[2]
    assert pipelines[3] is not pipelines[0]
    assert repr(pipelines[3]) == "<Pipeline tag-mid+tag-low rewrite=0 access=2 response=0 log=0>"


def test_phases_are_inferred_from_overridden_hooks():
    assert sample_plugins.TagMid.phases == frozenset({"access"})
    assert sample_plugins.TagRewrite.phases == frozenset({"rewrite"})
    assert sample_plugins.LogRecorder.phases == frozenset({"log"})
    assert sample_plugins.TagMid.config_model is sample_plugins.TagConfig


# -- scoping and precedence ---------------------------------------------------------------------------------
def precedence_config() -> dict[str, Any]:
    return {
        "services": [
            {
                "name": "backend",
                "url": "http://127.0.0.1:9",
                "plugins": [{"name": S + "TagMid", "config": {"tag": "service"}}],
            },
            {"name": "plain", "url": "http://127.0.0.1:9"},
        ],
        "routes": [
            {"name": "svc", "service": "backend", "paths": ["/svc"]},
            {
                "name": "own",
                "service": "backend",
                "paths": ["/own"],
                "plugins": [{"name": S + "TagMid", "config": {"tag": "route"}}],
            },
            {
                "name": "off",
                "service": "plain",
                "paths": ["/off"],
                "plugins": [{"name": S + "TagMid", "enabled": False}],
            },
            {"name": "global", "service": "plain", "paths": ["/"]},
        ],
        "plugins": [
            {"name": "key-auth"},
            {"name": S + "TagMid", "config": {"tag": "global"}},
            {"name": S + "TagMid", "consumer": "alice", "route": "own", "config": {"tag": "alice+route"}},
        ],
        "consumers": [
            {
                "username": "alice",
                "credentials": {"key-auth": [{"key": "alice-key"}]},
                "plugins": [{"name": S + "TagMid", "config": {"tag": "alice"}}],
            },
            {"username": "bob", "credentials": {"key-auth": [{"key": "bob-key"}]}},
        ],
    }


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ("/elsewhere", "bob-key", ["tag-mid:global"]),
        ("/svc", "bob-key", ["tag-mid:service"]),
        ("/own", "bob-key", ["tag-mid:route"]),
        ("/off", "bob-key", []),
        ("/elsewhere", "alice-key", ["tag-mid:alice"]),  # consumer beats global
        ("/svc", "alice-key", ["tag-mid:alice"]),  # consumer beats service
        ("/own", "alice-key", ["tag-mid:alice+route"]),  # consumer+route beats consumer and route
        ("/off", "alice-key", ["tag-mid:alice"]),  # consumer beats a route that switches it off
    ],
)
def test_most_specific_instance_wins(harness, path, key, expected):
    gw = harness(precedence_config())
    assert trace(gw.request("GET", path, {"apikey": key})) == expected


def test_consumer_pipeline_continues_after_the_authenticating_hook(harness):
    config = {
        "plugins": [
            {"name": "key-auth"},
            {"name": S + "TagHigh"},
            {"name": S + "TagLow", "config": {"tag": "g"}},
        ],
        "consumers": [
            {
                "username": "alice",
                "credentials": {"key-auth": [{"key": "alice-key"}]},
                "plugins": [
                    {"name": S + "TagLow", "config": {"tag": "alice"}},
                    {
                        "name": S + "TagHigh",
                        "config": {"tag": "too-late"},
                    },  # sorts before key-auth: cannot apply
                    {"name": S + "AsyncTag", "config": {"tag": "alice"}},
                ],
            },
        ],
    }
    gw = harness(config)
    # tag-high (3500) already ran, with the route's config, before key-auth (2500) identified alice
    assert trace(gw.request("GET", "/", {"apikey": "alice-key"})) == [
        "tag-high:x",
        "async-tag:alice",
        "tag-low:alice",
    ]
    assert trace(gw.request("GET", "/", {"apikey": "alice-key"})) == [
        "tag-high:x",
        "async-tag:alice",
        "tag-low:alice",
    ]
    pipeline = gw.worker.snapshot.routes[0].pipeline
    assert repr(pipeline.consumers) == "<ConsumerPipelines cached=1>"


def test_consumer_plugins_apply_to_the_anonymous_consumer(harness):
    config = {
        "plugins": [{"name": "key-auth", "config": {"anonymous": "guest"}}],
        "consumers": [{"username": "guest", "plugins": [{"name": S + "Teapot"}]}, *CONSUMERS],
    }
    gw = harness(config)
    assert gw.request("GET", "/").status == 418
    assert gw.request("GET", "/", {"apikey": "alice-key"}).status == 200


# -- async hooks, and no coroutine when none is needed ------------------------------------------------------
def test_async_hook_awaits_then_continues(harness):
    gw = harness({"plugins": [{"name": S + "TagHigh"}, {"name": S + "AsyncTag"}, {"name": S + "TagLow"}]})
    assert trace(gw.request()) == ["tag-high:x", "async-tag:x", "tag-low:x"]


def test_synchronous_hooks_create_no_task(harness, monkeypatch):
    gw = harness(
        {
            "plugins": [{"name": "key-auth"}, {"name": "correlation-id"}, {"name": S + "TagLow"}],
            "consumers": CONSUMERS,
        }
    )
    created = []
    original = gw.loop.create_task

    def counting(coro, **kwargs):
        if getattr(coro, "__name__", "") != "sleep":  # the harness's own loop stepping
            created.append(coro)
        return original(coro, **kwargs)

    monkeypatch.setattr(gw.loop, "create_task", counting)
    assert gw.request("GET", "/", {"apikey": "alice-key"}).status == 200
    assert created == []


# -- failures -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", ["Boom", "AsyncBoom"])
def test_a_raising_plugin_answers_500_with_request_id_and_the_worker_lives(harness, plugin):
    gw = harness(
        {
            "routes": [
                {"name": "bad", "service": "backend", "paths": ["/bad"], "plugins": [{"name": S + plugin}]},
                {"name": "good", "service": "backend", "paths": ["/"]},
            ]
        }
    )
    result = gw.request("GET", "/bad")
    assert result.status == 500
    assert result.upstream is None
    body = result.json()
    assert body == {"message": "internal gateway error", "request_id": result.header("x-request-id")}
    message, error = gw.logged[-1]
    assert message == f"plugin {plugin.lower().replace('asyncboom', 'async-boom')!r} failed in access"
    assert isinstance(error, RuntimeError)
    assert gw.request("GET", "/fine").status == 200


def test_a_tollway_error_from_a_plugin_answers_its_status(harness):
    gw = harness({"plugins": [{"name": S + "Refuse"}]})
    result = gw.request()
    assert result.status == 400
    assert result.json()["message"] == "refused on purpose"
    assert gw.logged == []


def test_a_returned_response_short_circuits(harness):
    gw = harness({"plugins": [{"name": S + "Teapot"}, {"name": S + "TagLow"}]})
    result = gw.request()
    assert result.status == 418
    assert result.upstream is None


def test_a_hook_that_answered_itself_ends_the_phase(harness):
    # Boom sorts after it: had its hook run on the answered request, it would have logged a failure.
    gw = harness({"plugins": [{"name": S + "AnswersItself"}, {"name": S + "Boom"}]})
    result = gw.request()
    assert result.status == 418 and result.json()["message"] == "answered in the hook"
    assert result.upstream is None
    assert gw.logged == []


def test_a_raising_response_hook_answers_500(harness):
    gw = harness({"plugins": [{"name": S + "ResponseBoom"}]})
    result = gw.request()
    assert result.status == 500
    assert gw.logged[-1][0] == "plugin 'response-boom' failed in response"


def test_a_raising_log_hook_is_logged_only(harness):
    sample_plugins.LOGGED.clear()
    gw = harness(
        {
            "plugins": [{"name": S + "LogBoom"}, {"name": S + "LogRecorder"}, {"name": "key-auth"}],
            "consumers": CONSUMERS,
        }
    )
    assert gw.request("GET", "/", {"apikey": "bob-key"}).status == 200
    assert gw.logged[-1][0] == "plugin 'log-boom' failed in log"
    assert sample_plugins.LOGGED == [(200, "bob")]


# -- the registry and load-time validation ----------------------------------------------------------------
def test_config_errors_name_entity_plugin_and_field():
    config = gateway_config(
        "http://127.0.0.1:9",
        routes=[
            {
                "name": "users",
                "service": "backend",
                "paths": ["/"],
                "plugins": [{"name": "key-auth", "config": {"key_names": ["bad name"], "typo": 1}}],
            },
        ],
    )
    found = issues(config)
    assert (
        'routes[0] "users": plugins[0] "key-auth": config.key_names[0]: '
        "'bad name' is not a valid header name" in ("\n".join(found))
    )
    assert any('plugins[0] "key-auth": config.typo: unknown field' in i for i in found)


def test_config_errors_carry_the_yaml_line():
    text = """
services: [{name: b, url: "http://127.0.0.1:9"}]
routes:
  - name: r
    service: b
    paths: ["/"]
    plugins:
      - name: cors
        config:
          origins: ["ftp://nope"]
"""
    with pytest.raises(ConfigError) as info:
        load_text(text, "gw.yaml", plugins=PLUGIN_CHECK)
    assert info.value.issues[0].startswith('gw.yaml:10: routes[0] "r": plugins[0] "cors": config.origins:')


def test_unknown_plugins_and_bad_import_paths():
    config = {
        "plugins": [
            {"name": "nope"},
            {"name": "no.such.module:X"},
            {"name": S + "NotAPlugin"},
            {"name": "tests.plugins.sample_plugins:Missing"},
        ]
    }
    found = issues(config)
    assert found[0].startswith("gw.yaml: plugins[0] \"nope\": name: unknown plugin 'nope'")
    assert "cannot import 'no.such.module'" in found[1]
    assert "is not a subclass of tollway.plugins.Plugin" in found[2]
    assert "is not a subclass of tollway.plugins.Plugin" in found[3]


def test_entry_point_plugins(monkeypatch):
    class EntryPoint:
        name = "tagger"
        value = S + "TagLow"

    monkeypatch.setattr(
        registry, "entry_points", lambda group: [EntryPoint()] if group == "tollway.plugins" else []
    )
    monkeypatch.setattr(registry, "_RESOLVED", {})
    assert registry.resolve("tagger") is sample_plugins.TagLow
    validate({"plugins": [{"name": "tagger", "config": {"tag": "t"}}]}, plugins=PLUGIN_CHECK)


def test_scoping_rules_are_checked():
    config = {
        "routes": [{"name": "r", "service": "s", "paths": ["/"], "plugin_order": ["cors", "nope", "cors"]}],
        "services": [{"name": "s", "url": "http://127.0.0.1:9"}],
        "plugins": [
            {"name": "key-auth", "consumer": "alice"},
            {"name": "key-auth", "config": {"anonymous": "nobody"}},
            {"name": "acl", "config": {"allow": ["a"]}},
            {"name": "acl", "config": {"allow": ["b"]}},
        ],
        "consumers": [
            {"username": "alice", "credentials": {"cors": [{}], "key-auth": [{"key": "k"}, {"key": "k"}]}}
        ],
    }
    found = "\n".join(issues(config))
    assert "plugins[0] \"key-auth\": name: 'key-auth' cannot be configured per consumer" in found
    assert "plugins[1] \"key-auth\": config.anonymous: unknown consumer 'nobody'" in found
    assert "plugins[3] \"acl\": name: 'acl' is configured twice for the same scope" in found
    assert "routes[0] \"r\": plugin_order[1]: unknown plugin 'nope'" in found
    assert "routes[0] \"r\": plugin_order[2]: 'cors' is listed twice" in found
    assert "consumers[0] \"alice\": credentials.cors: plugin 'cors' takes no credentials" in found
    assert "credentials.key-auth[1]: the same credential is already given to consumer 'alice'" in found


def test_plugin_classes_need_a_kebab_case_name(monkeypatch):
    class Bad(Plugin):  # type: ignore[type-arg]
        name = "Bad_Name"

    monkeypatch.setattr(sample_plugins, "Bad", Bad, raising=False)
    with pytest.raises(registry.PluginLoadError, match="kebab-case"):
        registry._load(S + "Bad")


# -- through a real gateway ---------------------------------------------------------------------------------
@pytest.mark.integration
def test_plugin_failure_through_a_real_gateway(gateway, backend):
    be = backend()
    config = gateway_config(
        be.url,
        routes=[
            {"name": "bad", "service": "backend", "paths": ["/bad"], "plugins": [{"name": S + "Boom"}]},
            {"name": "ok", "service": "backend", "paths": ["/"], "plugins": [{"name": S + "TagLow"}]},
        ],
    )
    gw = gateway(config)
    pids = gw.worker_pids()
    resp = request(gw.port, "GET", "/bad")
    assert resp.status == 500
    assert resp.json()["request_id"] == resp.header("x-request-id")
    gw.wait_for_output(r"plugin 'boom' failed in access \(request " + resp.header("x-request-id") + r"\)")
    gw.wait_for_output(r"RuntimeError: plugin bug")
    ok = request(gw.port, "GET", "/ok")
    assert ok.status == 200
    assert be.seen[-1].header("x-trace") == "tag-low:x"
    assert gw.worker_pids() == pids  # the same worker answered: it did not die


def test_a_user_authentication_plugin_with_credentials(harness):
    name = S + "TokenAuth"
    gw = harness(
        {
            "plugins": [{"name": name}],
            "consumers": [
                {"username": "tia", "credentials": {name: [{"token": "t-1"}]}},
                {"username": "tom", "credentials": {"token-auth": [{"token": "t-2"}]}},
            ],
        }
    )
    assert gw.request("GET", "/", {"X-Token": "t-1"}).upstream.header("x-consumer-username") == "tia"
    assert gw.request("GET", "/", {"X-Token": "t-2"}).upstream.header("x-consumer-username") == "tom"
    denied = gw.request("GET", "/", {"X-Token": "t-3"})
    assert denied.status == 401
    assert denied.header("www-authenticate") == 'Token realm="tollway"'
    found = issues(
        {
            "plugins": [{"name": name}],
            "consumers": [{"username": "a", "credentials": {name: [{"token": "x"}, {"tok": "y"}]}}],
        }
    )
    assert found == [
        f'gw.yaml: consumers[0] "a": credentials.{name}[1].token: required field is missing',
        f'gw.yaml: consumers[0] "a": credentials.{name}[1].tok: unknown field (did you mean "token"?)',
    ]
