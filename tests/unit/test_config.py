"""Configuration: the YAML loader's errors (file line, entity name, field), unknown fields, references
between entities, durations and sizes, and every validator of the schema.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from tollway.config.loader import describe_loc, load_file, load_text, validate
from tollway.config.schema import GatewayConfig, Limits, Route, Service, Target, Timeouts
from tollway.config.types import check_cidr, check_name, parse_duration, parse_hostport, parse_size
from tollway.errors import ConfigError
from tollway.plugins.registry import PLUGIN_CHECK

BASE = """\
services:
  - name: users
    url: http://127.0.0.1:8001
routes:
  - name: users
    service: users
    paths: [/users]
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), "gw.yaml", plugins=PLUGIN_CHECK)
    assert info.value.source == "gw.yaml"
    return info.value.issues


def error(text: str) -> str:
    (issue,) = errors(text)
    return issue


def route(**fields: Any) -> Route:
    return Route.model_validate({"name": "r", "service": "s", **fields})


def route_error(**fields: Any) -> str:
    with pytest.raises(ValueError) as info:
        route(**fields)
    return str(info.value)


# -- loading ---------------------------------------------------------------------------------------
def test_a_valid_file(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(BASE)
    config = load_file(path)
    assert [s.name for s in config.services] == ["users"]
    assert config.routes[0].paths == ["/users"]


def test_empty_file_is_the_defaults() -> None:
    config = load_text("", "gw.yaml")
    assert config == GatewayConfig()
    assert config.gateway.listen == ["0.0.0.0:8000"]


def test_safe_defaults() -> None:
    gateway = GatewayConfig().gateway
    assert (gateway.limits.max_request_line, gateway.limits.max_header_size, gateway.limits.max_headers) == (
        8192,
        32768,
        100,
    )
    assert gateway.limits.max_body_size == 100 * 1024 * 1024
    assert gateway.timeouts.client_header == 10.0
    assert gateway.timeouts.keepalive == 60.0
    service = Service(name="s", url="http://a:1")
    assert (service.connect_timeout, service.read_timeout, service.write_timeout) == (5.0, 60.0, 60.0)


def test_unreadable_and_non_utf8_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_file(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"gateway: {server_header: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_file(bad)


def test_yaml_syntax_error_has_its_line() -> None:
    # the line that opened the unclosed "[", not the one where YAML noticed
    assert error("services:\n  - name: a\n    url: [unclosed\n").startswith("gw.yaml:3: invalid YAML")


def test_top_level_must_be_a_mapping() -> None:
    assert error("- a\n- b\n") == "gw.yaml: the top level must be a mapping of sections"


def test_error_names_the_line_the_entity_and_the_field() -> None:
    text = BASE + "  - name: orders\n    service: users\n    paths: [orders]\n"
    assert (
        error(text) == 'gw.yaml:10: routes[1] "orders": paths[0]: must start with "/" '
        '(or "=/" for an exact path, "~" for a regular expression)'
    )


def test_unknown_fields_are_errors_everywhere() -> None:
    text = """\
    gatway: {}
    gateway:
      limits:
        max_body: 10
    services:
      - name: users
        url: http://127.0.0.1:8001
        timeout: 5
    routes:
      - name: users
        service: users
        path: [/users]
    """
    assert errors(text) == [  # in file order, each with the field it was probably meant to be
        'gw.yaml:1: gatway: unknown field (did you mean "gateway"?)',
        'gw.yaml:4: gateway.limits.max_body: unknown field (did you mean "max_body_size"?)',
        'gw.yaml:8: services[0] "users": timeout: unknown field (did you mean "read_timeout"?)',
        'gw.yaml:12: routes[0] "users": path: unknown field (did you mean "paths"?)',
    ]


def test_missing_required_fields() -> None:
    issues = errors("services:\n  - url: http://a:1\nroutes:\n  - name: r\n    paths: [/]\n")
    assert "gw.yaml:2: services[0].name: required field is missing" in issues
    assert 'gw.yaml:4: routes[0] "r": service: required field is missing' in issues


def test_duplicate_yaml_keys_are_errors() -> None:
    text = BASE + "routes:\n  - name: other\n    service: users\n    paths: [/other]\n"
    assert error(text) == "gw.yaml:8: routes: duplicate key (it replaces the one on line 4)"
    nested = "gateway:\n  limits: {max_headers: 10, max_headers: 20}\n"
    assert (
        error(nested)
        == "gw.yaml:2: gateway.limits.max_headers: duplicate key (it replaces the one on line 2)"
    )


# -- references between entities ----------------------------------------------------------------------
def test_unknown_references() -> None:
    text = """\
    upstreams:
      - name: pool
        targets: [{target: "127.0.0.1:1"}]
    services:
      - {name: a, upstream: poool}
    routes:
      - {name: r, service: b, paths: [/]}
    consumers:
      - {username: alice}
    plugins:
      - {name: correlation-id, route: rr, service: a, consumer: bob}
    """
    assert errors(text) == [
        'gw.yaml:5: services[0] "a": upstream: unknown upstream \'poool\' (did you mean "pool"?)',
        "gw.yaml:7: routes[0] \"r\": service: unknown service 'b'",
        'gw.yaml:11: plugins[0] "correlation-id": route: unknown route \'rr\' (did you mean "r"?)',
        "gw.yaml:11: plugins[0] \"correlation-id\": consumer: unknown consumer 'bob'",
    ]


def test_duplicate_names() -> None:
    text = (
        BASE
        + "  - {name: users, service: users, paths: [/u2]}\n"
        + "  - {name: other, service: users, paths: [/o]}\n"
    )
    assert error(text) == "gw.yaml:8: routes[1] \"users\": name: duplicate name 'users'"


def test_scopes_only_on_top_level_plugins() -> None:
    text = BASE + "    plugins: [{name: correlation-id, service: users}]\n"
    assert (
        error(text) == 'gw.yaml:8: routes[0] "users": plugins[0] "correlation-id": route: '
        "route/service/consumer are only allowed on top-level plugins"
    )


def test_unknown_plugin() -> None:
    assert (
        error(BASE + "plugins: [{name: nope}]\n")
        == "gw.yaml:8: plugins[0] \"nope\": name: unknown plugin 'nope' (not built in, not an entry point in "
        "group 'tollway.plugins'; a plugin in your own module is named \"package.module:Class\")"
    )


def test_schema_and_reference_errors_are_reported_together() -> None:
    text = """\
    services:
      - {name: a, url: "ftp://x"}
    routes:
      - {name: r1, service: a, paths: [nope]}
      - {name: r2, service: missing, paths: [/ok]}
    """
    assert errors(text) == [
        'gw.yaml:2: services[0] "a": url: must start with http:// or https://',
        'gw.yaml:4: routes[0] "r1": paths[0]: must start with "/" (or "=/" for an exact path, '
        '"~" for a regular expression)',
        "gw.yaml:5: routes[1] \"r2\": service: unknown service 'missing'",
    ]


def test_validate_a_document_from_elsewhere() -> None:
    config = validate({"services": [{"name": "a", "url": "http://x:1"}]}, source="store")
    assert config.services[0].name == "a"
    with pytest.raises(ConfigError) as info:
        validate({"services": [{"name": "a"}]}, source="store")
    assert info.value.issues == ['store: services[0] "a": exactly one of `url` or `upstream` is required']


def test_describe_loc() -> None:
    data = {"routes": [{"name": "a"}, {"name": "b", "paths": ["x"]}], "gateway": {"limits": {}}}
    assert describe_loc(data, ("routes", 1, "paths", 0)) == 'routes[1] "b": paths[0]'
    assert describe_loc(data, ("gateway", "limits", "max_headers")) == "gateway.limits.max_headers"
    assert describe_loc(data, ()) == "(top level)"
    assert describe_loc(data, ("routes", 7, "name")) == "routes[7].name"  # no such entity: no name


# -- durations, sizes and other value types ----------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("5", 5.0),
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 3 s ", 3.0),
        (0, 0.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 parsecs", "-1s", -1, True, "", "s", "1.s", None, [1]])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("64k", 65536),
        ("64kb", 65536),
        ("64KiB", 65536),
        ("10mb", 10 * 2**20),
        ("1g", 2**30),
        ("1GB", 2**30),
        ("100b", 100),
        (0, 0),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5k", "-1", -1, True, "10 tb", "k", 1.5, None])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_durations_and_sizes_in_a_file() -> None:
    config = load_text("gateway:\n  timeouts: {client_header: 250ms}\n  limits: {max_body_size: 10mb}\n")
    assert config.gateway.timeouts.client_header == 0.25
    assert config.gateway.limits.max_body_size == 10 * 2**20
    assert error("gateway:\n  timeouts: {client_header: soon}\n") == (
        'gw.yaml:2: gateway.timeouts.client_header: must be a duration such as 5, "5s" or "250ms"'
    )


@pytest.mark.parametrize("name", ["a", "users-v2", "a.b_c~d", "9lives", "x" * 128])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a b", "a/b", "x" * 129, "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8000", ("::1", 8000)),
        (":8000", ("0.0.0.0", 8000)),
        ("example.com:0", ("example.com", 0)),
    ],
)
def test_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "a:b", "a:65536", "::1:80", "a:-1"])
def test_bad_hostport(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_cidr() -> None:
    assert check_cidr("10.0.0.0/8") == "10.0.0.0/8"
    assert check_cidr("::1") == "::1"
    with pytest.raises(ValueError):
        check_cidr("10.0.0.0/33")


# -- node settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gateway: {listen: []}", "gateway.listen: must not be empty"),
        ("gateway: {listen: ['nope']}", "gateway.listen[0]: 'nope' must be host:port"),
        ("gateway: {workers: many}", "gateway.workers: must be a whole number"),
        ("gateway: {backlog: 0}", "gateway.backlog: must be at least 1, not 0"),
        (
            "gateway: {trusted_proxies: [10.0.0.0/99]}",
            "gateway.trusted_proxies[0]: '10.0.0.0/99' is not an IP",
        ),
        ("gateway: {limits: {max_headers: 0}}", "gateway.limits.max_headers: must be at least 1"),
        ("gateway: {limits: {max_request_line: 10}}", "gateway.limits.max_request_line: must be at least 64"),
        (
            "gateway: {timeouts: {client_header: 0}}",
            "gateway.timeouts.client_header: must be more than 0, not 0",
        ),
        ("gateway: {drain_timeout: -1}", "gateway.drain_timeout: must not be negative"),
        (
            "gateway: {access_log: {enabled: maybe}}",
            "gateway.access_log.enabled: must be true or false, not 'maybe'",
        ),
    ],
)
def test_gateway_settings(text: str, message: str) -> None:
    assert error(text).startswith("gw.yaml:1: " + message)


def test_gateway_settings_accepted() -> None:
    config = load_text(
        "gateway: {workers: auto, status_listen: null, keepalive: 0}".replace(", keepalive: 0", "")
    )
    assert config.gateway.workers == "auto" and config.gateway.status_listen is None
    assert Timeouts(keepalive=0).keepalive == 0
    assert Limits(max_body_size=0).max_body_size == 0


# -- services, upstreams ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "ftp://a"}, "must start with http:// or https://"),
        ({"url": "http://"}, "must name a host"),
        ({"url": "http://a:1/x?y=1"}, "must not have a query or fragment"),
        ({"url": "http://a:99999"}, "has an invalid port"),
        ({"url": "http://a:1", "upstream": "u"}, "exactly one of `url` or `upstream`"),
        ({}, "exactly one of `url` or `upstream`"),
        ({"upstream": "u", "path": "x"}, 'must start with "/"'),
        ({"url": "http://a:1", "connect_timeout": 0}, "greater than 0"),
    ],
)
def test_service_validation(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        Service.model_validate({"name": "s", **fields})


def test_targets() -> None:
    assert Target(target="10.0.0.1:80", weight=0).weight == 0
    for bad in ({"target": "10.0.0.1"}, {"target": "a:1", "weight": -1}, {"target": "a:1", "weight": 70000}):
        with pytest.raises(ValueError):
            Target.model_validate(bad)
    assert error("upstreams: [{name: u, targets: []}]").startswith(
        'gw.yaml:1: upstreams[0] "u": targets: must not be empty'
    )


# -- routes -------------------------------------------------------------------------------------------
def test_route_needs_a_matcher() -> None:
    assert "needs at least one of hosts, paths, methods, headers or query" in route_error()


@pytest.mark.parametrize(
    "host", ["api.example.com", "*.example.com", "example.*", "API.Example.COM", "a_b.c"]
)
def test_valid_hosts(host: str) -> None:
    assert route(hosts=[host]).hosts == [host.lower()]


@pytest.mark.parametrize("host", ["api.example.com:80", "*.example.*", "a..b", "-a.com", "*", "a b", "*.*"])
def test_invalid_hosts(host: str) -> None:
    route_error(hosts=[host])


def test_methods() -> None:
    assert route(methods=["get", "PURGE"]).methods == ["GET", "PURGE"]
    assert "not an HTTP method" in route_error(methods=["GET POST"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("users", 'must start with "/"'),
        ("=users", 'must start with "/"'),
        ("~[", "invalid regular expression"),
        ("/u{id}", "a parameter must be a whole segment"),
        ("/users/{id", "unbalanced braces"),
        ("/users/id}", "unbalanced braces"),
        ("/users/{1d}", "not a valid parameter name"),
        ("/a/{x}/{x}", "parameter names must be unique"),
        ("/a/{rest*}/b", "must be the last segment"),
        ("=/users/{id}", "an exact path"),
        ("/a//b", '"//"'),
        ("//", '"//"'),
        ("/a/./b", '"." or ".."'),
        ("/a/..", '"." or ".."'),
        ("=/a/../b", '"." or ".."'),
        ("/a/%2e%2E/b", '"." or ".."'),
        ("/a/%2E", '"." or ".."'),
        ("/a%zz", "malformed %-escape"),
        ("/a%2", "malformed %-escape"),
    ],
)
def test_invalid_paths(path: str, message: str) -> None:
    assert message in route_error(paths=[path])


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api",
        "/api/",
        "=/api",
        "/users/{id}",
        "/files/{rest*}",
        "/a%2Fb",
        "/a.b/..c",
        "/.well-known",
        "~^/a//b",
    ],
)
def test_valid_paths(path: str) -> None:
    assert route(paths=[path]).paths == [path]


def test_header_matchers() -> None:
    assert route(headers={"X-Env": ["a", "~^dev-"]}).headers == {"x-env": ["a", "~^dev-"]}
    assert "not a valid header name" in route_error(headers={"x env": "a"})
    assert "invalid regular expression" in route_error(headers={"x-env": "~("})
    assert "listed twice" in route_error(headers={"X-Env": "a", "x-env": "b"})
    assert "an empty list matches nothing" in route_error(headers={"x-env": []})


def test_query_matchers() -> None:
    assert route(query={"Case": "x"}).query == {"Case": "x"}  # query names keep their case
    assert "an empty list matches nothing" in route_error(query={"v": []})
    assert "invalid regular expression" in route_error(query={"v": ["~["]})


def test_numbers_in_matchers_are_text() -> None:
    config = load_text(BASE.replace("paths: [/users]", "query: {v: 2, w: [1, 2.5]}\n    headers: {x-n: 7}"))
    assert config.routes[0].query == {"v": "2", "w": ["1", "2.5"]}
    assert config.routes[0].headers == {"x-n": "7"}
    assert "read as a boolean" in route_error(query={"debug": True})


def test_rewrite() -> None:
    assert route(paths=["/u/{id}"], rewrite="/v2/{id}").rewrite == "/v2/{id}"
    assert route(paths=["~^/v(?P<ver>[0-9]+)"], rewrite="/api/{ver}").rewrite == "/api/{ver}"
    assert 'must start with "/"' in route_error(paths=["/u/{id}"], rewrite="v2/{id}")
    assert "unbalanced braces" in route_error(paths=["/u/{id}"], rewrite="/v2/{id")
    assert "unbalanced braces" in route_error(paths=["/u"], rewrite="/v2/}")
    assert "not a valid parameter name" in route_error(paths=["/u/{id}"], rewrite="/v2/{}")
    assert "not a parameter of every path" in route_error(paths=["/u/{id}", "/x"], rewrite="/v2/{id}")


def test_route_errors_in_a_file_point_at_the_route() -> None:
    text = BASE.replace("paths: [/users]", "paths: ['/users/{id}']\n    rewrite: /v2/{id")
    assert error(text) == 'gw.yaml:5: routes[0] "users": rewrite: unbalanced braces'


def test_plugin_configs_are_checked_by_the_check_the_loader_is_given() -> None:
    document = {"plugins": [{"name": "no-such-plugin"}]}
    assert validate(document).plugins[0].name == "no-such-plugin"  # config imports no plugin code
    with pytest.raises(ConfigError, match=r"plugins\[0\].*unknown plugin"):
        validate(document, plugins=PLUGIN_CHECK)
    seen: list[tuple[object, ...]] = []

    class Check:  # any object of the PluginCheck shape will do
        def check_config(self, config, instances):
            seen.extend(loc for loc, _instance, _top in instances)
            yield ("plugins", 0, "config"), "refused by the check"

        def check_document(self, plugin):
            return iter(())

    with pytest.raises(ConfigError, match="refused by the check"):
        validate(document, plugins=Check())
    assert seen == [("plugins", 0)]


def test_an_invalid_document_whose_last_entity_has_no_plugins_is_reported_not_crashed() -> None:
    # The plugin checks of a rejected document once used the last entity's `plugins` (None here) as
    # the checker: `tollway check` and the admin API died with AttributeError instead of reporting.
    document = {
        "services": [
            {
                "name": "a",
                "url": "http://127.0.0.1:9",
                "connect_timeout": {"x": 1},
                "plugins": [{"name": "nope"}],
            },
            {"name": "b", "url": "http://127.0.0.1:9"},
        ]
    }
    with pytest.raises(ConfigError) as caught:
        validate(document, plugins=PLUGIN_CHECK)
    assert any("connect_timeout" in issue for issue in caught.value.issues)
    assert any("unknown plugin 'nope'" in issue for issue in caught.value.issues)
