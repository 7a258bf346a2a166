"""The router: path kinds, hosts, matchers, strip_path/rewrite, 404/405 and every precedence rule.

Routes are built through `Route.model_validate`, so these tests exercise the real schema too.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway.config.schema import Route
from tollway.router import MethodNotAllowed, RouteMatch, Router
from tollway.router import table as table_module
from tollway.router.index import EMPTY_PARAMS

Headers = list[tuple[bytes, bytes]]


def route(name: str = "r", **fields: Any) -> Route:
    return Route.model_validate({"name": name, "service": "svc", **fields})


def router(*routes: Route) -> Router[str]:
    return Router([(r, r.name) for r in routes])


def match(
    table: Router[str],
    path: str,
    method: str = "GET",
    host: str = "",
    query: str = "",
    headers: Headers | None = None,
) -> RouteMatch[str] | MethodNotAllowed | None:
    return table.match(method, host, path, query, headers or [])


def winner(table: Router[str], path: str, **request: Any) -> str | None:
    """The name of the matched route, or None; fails on a 405."""
    found = match(table, path, **request)
    assert not isinstance(found, MethodNotAllowed), found
    return found.route if found is not None else None


def forwarded(table: Router[str], path: str, **request: Any) -> tuple[str, dict[str, str]]:
    found = match(table, path, **request)
    assert isinstance(found, RouteMatch), found
    return found.path, found.params


# -- path kinds --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "hit"),
    [("/api", True), ("/api/", True), ("/api/x/y", True), ("/apix", True), ("/ap", False), ("/", False)],
)
def test_prefix_is_a_plain_string_prefix(path: str, hit: bool) -> None:
    assert (winner(router(route("a", paths=["/api"])), path) == "a") is hit


@pytest.mark.parametrize(
    ("path", "hit"), [("/api/", True), ("/api/x", True), ("/api", False), ("/apix", False)]
)
def test_prefix_ending_with_a_slash(path: str, hit: bool) -> None:
    assert (winner(router(route("a", paths=["/api/"])), path) == "a") is hit


@pytest.mark.parametrize(
    ("path", "hit"),
    [("/api/v1/us", True), ("/api/v1/users/7", True), ("/api/v1/u", False), ("/api/v2/users", False)],
)
def test_prefix_ending_inside_a_segment(path: str, hit: bool) -> None:
    assert (winner(router(route("a", paths=["/api/v1/us"])), path) == "a") is hit


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/api/x", "slash"),
        ("POST", "/api/x", "short"),  # the segment "api" is a whole tail: "ap" comes with it
        ("POST", "/api", "short"),
        ("GET", "/apiz", "long"),  # "apiz" is not a tail: tails are probed by length
        ("POST", "/apiz/x", "short"),
        ("GET", "/a", None),
    ],
)
def test_every_matching_prefix_is_a_candidate(method: str, path: str, expected: str | None) -> None:
    table = router(
        route("short", paths=["/ap"]),
        route("long", paths=["/api"], methods=["GET"]),
        route("slash", paths=["/api/"], methods=["GET"]),
    )
    assert winner(table, path, method=method) == expected


def test_root_prefix_matches_everything() -> None:
    table = router(route("root", paths=["/"]))
    assert [winner(table, path) for path in ("/", "/a", "/a/b/")] == ["root", "root", "root"]


@pytest.mark.parametrize(
    ("path", "hit"), [("/api", True), ("/api/", False), ("/api/x", False), ("/ap", False)]
)
def test_exact_path(path: str, hit: bool) -> None:
    assert (winner(router(route("a", paths=["=/api"])), path) == "a") is hit


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/users/7", {"id": "7"}),
        ("/users/7/orders", None),
        ("/users/", None),
        ("/users", None),
        ("/users//", None),
        ("/usersx/7", None),
    ],
)
def test_template_matches_whole_segments(path: str, params: dict[str, str] | None) -> None:
    found = match(router(route("u", paths=["/users/{id}"])), path)
    assert (found.params if isinstance(found, RouteMatch) else None) == params


def test_template_with_several_parameters() -> None:
    table = router(route("o", paths=["/users/{uid}/orders/{oid}"]))
    assert forwarded(table, "/users/7/orders/9") == ("/users/7/orders/9", {"uid": "7", "oid": "9"})
    assert winner(table, "/users/7/orders/") is None


def test_template_with_a_trailing_slash() -> None:
    table = router(route("u", paths=["/users/{id}/"]))
    assert winner(table, "/users/7/") == "u"
    assert winner(table, "/users/7") is None


@pytest.mark.parametrize(
    ("path", "rest"),
    [("/files", ""), ("/files/", ""), ("/files/a", "a"), ("/files/a/b", "a/b"), ("/filesx", None)],
)
def test_catch_all_takes_zero_or_more_segments(path: str, rest: str | None) -> None:
    found = match(router(route("f", paths=["/files/{rest*}"])), path)
    assert (found.params["rest"] if isinstance(found, RouteMatch) else None) == rest


def test_catch_all_after_parameters() -> None:
    table = router(route("f", paths=["/b/{bucket}/{key*}"]))
    assert forwarded(table, "/b/pics/2024/cat.png")[1] == {"bucket": "pics", "key": "2024/cat.png"}
    assert forwarded(table, "/b/pics")[1] == {"bucket": "pics", "key": ""}


def test_catch_all_at_the_root() -> None:
    table = router(route("all", paths=["/{path*}"]))
    assert forwarded(table, "/")[1] == {"path": ""}
    assert forwarded(table, "/a/b")[1] == {"path": "a/b"}


def test_templates_sharing_nodes_keep_their_own_names() -> None:
    table = router(route("one", paths=["/users/{id}"]), route("orders", paths=["/users/{uid}/orders"]))
    assert forwarded(table, "/users/7") == ("/users/7", {"id": "7"})
    assert forwarded(table, "/users/8/orders") == ("/users/8/orders", {"uid": "8"})


def test_static_and_parameter_branches_are_both_explored() -> None:
    # /a/b/c can match both: the static branch "b" must not hide the parameter branch, and back.
    table = router(route("x", paths=["/a/{x}/c"]), route("y", paths=["/a/b/{y}"]))
    assert forwarded(table, "/a/b/c") == ("/a/b/c", {"x": "b"})  # same literal count: config order
    assert forwarded(table, "/a/b/d") == ("/a/b/d", {"y": "d"})
    assert forwarded(table, "/a/z/c") == ("/a/z/c", {"x": "z"})


def test_exact_path_with_braces_is_refused() -> None:
    # A template already matches exactly: "=/users/{id}" would be a second spelling of "/users/{id}".
    with pytest.raises(ValueError, match="exact path"):
        route("u", paths=["=/users/{id}"])


def test_regex_matches_at_the_start_and_captures_named_groups() -> None:
    table = router(route("v", paths=["~/v(?P<version>[0-9]+)/"]))
    assert forwarded(table, "/v2/users") == ("/v2/users", {"version": "2"})
    assert winner(table, "/api/v2/users") is None  # re.match, not re.search


def test_regex_group_that_did_not_take_part_captures_empty() -> None:
    table = router(route("v", paths=["~^/(?P<a>x)?(?P<b>y)"]))
    assert forwarded(table, "/y")[1] == {"a": "", "b": "y"}


def test_regex_without_groups_has_no_params() -> None:
    found = match(router(route("v", paths=["~^/health$"])), "/health")
    assert isinstance(found, RouteMatch) and found.params is EMPTY_PARAMS


def test_route_without_paths_matches_every_path() -> None:
    table = router(route("m", methods=["DELETE"]))
    assert winner(table, "/anything/at/all", method="DELETE") == "m"


def test_configured_escapes_are_normalized_like_requests() -> None:
    table = router(route("tilde", paths=["=/%7euser"]), route("space", paths=["/a%2fb"]))
    assert winner(table, "/~user") == "tilde"
    assert winner(table, "/a%2Fb/c") == "space"


def test_params_share_one_empty_dict_when_there_are_none() -> None:
    table = router(route("p", paths=["/p"]), route("e", paths=["=/e"]), route("m", methods=["GET"]))
    for path in ("/p", "/e", "/other"):
        found = match(table, path)
        assert isinstance(found, RouteMatch) and found.params is EMPTY_PARAMS


def test_no_route_is_none() -> None:
    assert match(router(route("a", paths=["/api"])), "/other") is None
    assert match(Router([]), "/") is None


# -- strip_path and rewrite --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/api", "/api/x", "/x"),
        ("/api", "/api", "/"),
        ("/api", "/apix", "/x"),
        ("/api/", "/api/x/y", "/x/y"),
        ("/api/", "/api/", "/"),
        ("/", "/x", "/x"),
        ("=/api", "/api", "/"),
        ("/users/{id}", "/users/7", "/"),
        ("/files/{rest*}", "/files/a/b", "/a/b"),
        ("/files/{rest*}", "/files/", "/"),
        ("/files/{rest*}", "/files", "/"),
        ("/b/{bucket}/{key*}", "/b/pics/a.png", "/a.png"),
        ("~^/v[0-9]+", "/v2/users", "/users"),
        ("~^/v[0-9]+/", "/v2/users", "/users"),
        ("~^/v[0-9]+/", "/v2/", "/"),
    ],
)
def test_strip_path_removes_the_matched_part(pattern: str, path: str, expected: str) -> None:
    assert forwarded(router(route("s", paths=[pattern], strip_path=True)), path)[0] == expected


def test_strip_path_without_paths_forwards_the_path() -> None:
    assert (
        forwarded(router(route("s", hosts=["a.example"], strip_path=True)), "/x", host="a.example")[0] == "/x"
    )


@pytest.mark.parametrize(
    ("pattern", "rewrite", "path", "expected"),
    [
        ("/users/{id}", "/v2/people/{id}", "/users/7", "/v2/people/7"),
        ("/files/{rest*}", "/static/{rest}", "/files/a/b", "/static/a/b"),
        ("/files/{rest*}", "/static/{rest*}", "/files", "/static/"),
        ("~^/v(?P<ver>[0-9]+)/", "/api/{ver}", "/v3/x", "/api/3"),
        ("/old", "/new", "/old/x", "/new"),
    ],
)
def test_rewrite_fills_the_template(pattern: str, rewrite: str, path: str, expected: str) -> None:
    assert forwarded(router(route("w", paths=[pattern], rewrite=rewrite)), path)[0] == expected


def test_rewrite_takes_precedence_over_strip_path() -> None:
    table = router(route("w", paths=["/users/{id}"], rewrite="/u/{id}", strip_path=True))
    assert forwarded(table, "/users/7")[0] == "/u/7"


def test_without_strip_or_rewrite_the_path_is_forwarded_unchanged() -> None:
    path = "/api/x"
    found = match(router(route("a", paths=["/api"])), path)
    assert isinstance(found, RouteMatch) and found.path is path


# -- hosts -------------------------------------------------------------------------------------------
def test_exact_host() -> None:
    table = router(route("h", hosts=["api.example.com"]))
    assert winner(table, "/", host="api.example.com") == "h"
    assert winner(table, "/", host="www.example.com") is None
    assert winner(table, "/", host="") is None


@pytest.mark.parametrize(
    ("host", "hit"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("example.com", False),
        ("aexample.com", False),
        ("a.example.org", False),
        (".example.com", False),  # an empty label is not a label
        ("", False),
    ],
)
def test_leading_wildcard_needs_at_least_one_label(host: str, hit: bool) -> None:
    assert (winner(router(route("w", hosts=["*.example.com"])), "/", host=host) == "w") is hit


@pytest.mark.parametrize(
    ("host", "hit"),
    [
        ("example.com", True),
        ("example.co.uk", True),
        ("example", False),
        ("example.", False),
        ("myexample.com", False),
    ],
)
def test_trailing_wildcard_needs_at_least_one_label(host: str, hit: bool) -> None:
    assert (winner(router(route("w", hosts=["example.*"])), "/", host=host) == "w") is hit


def test_host_and_path_must_both_match() -> None:
    table = router(route("a", hosts=["api.example.com"], paths=["/v1"]), route("b", paths=["/v1"]))
    assert winner(table, "/v1/x", host="api.example.com") == "a"
    assert winner(table, "/v1/x", host="www.example.com") == "b"
    assert winner(table, "/v2", host="api.example.com") is None


def test_host_cache_is_bounded_and_does_not_change_answers() -> None:
    table = router(route("w", hosts=["*.example.com"]), route("any", paths=["/"]))
    for i in range(table_module.HOST_CACHE_SIZE + 10):
        assert winner(table, "/", host=f"h{i}.example.com") == "w"
        assert winner(table, "/", host=f"h{i}.example.org") == "any"
    assert len(table._host_cache or {}) <= table_module.HOST_CACHE_SIZE


def test_repr() -> None:
    table = router(
        route("a", hosts=["a.example", "*.b.example"], paths=["/x", "/y"]), route("b", paths=["/"])
    )
    assert repr(table) == "<Router routes=2 variants=5 host_groups=2>"


# -- header and query matchers -----------------------------------------------------------------------
def test_header_exact_value_and_case_insensitive_names() -> None:
    table = router(route("h", headers={"X-Version": "2"}))
    assert winner(table, "/", headers=[(b"x-version", b"2")]) == "h"
    assert winner(table, "/", headers=[(b"X-VERSION", b"2")]) == "h"
    assert winner(table, "/", headers=[(b"x-version", b"20")]) is None


def test_header_regex_is_searched() -> None:
    table = router(route("h", headers={"user-agent": "~[Mm]obile"}))
    assert winner(table, "/", headers=[(b"user-agent", b"Foo Mobile Safari")]) == "h"
    assert winner(table, "/", headers=[(b"user-agent", b"Desktop")]) is None


def test_header_list_matches_any_item() -> None:
    table = router(route("h", headers={"x-env": ["staging", "~^dev"]}))
    assert winner(table, "/", headers=[(b"x-env", b"staging")]) == "h"
    assert winner(table, "/", headers=[(b"x-env", b"dev-3")]) == "h"
    assert winner(table, "/", headers=[(b"x-env", b"prod")]) is None


def test_absent_header_never_matches() -> None:
    table = router(route("h", headers={"x-any": "~.*"}), route("e", headers={"x-empty": "~^$"}))
    assert winner(table, "/", headers=[(b"other", b"1")]) is None


def test_repeated_header_any_occurrence_matches() -> None:
    table = router(route("h", headers={"x-tag": "b"}))
    assert winner(table, "/", headers=[(b"x-tag", b"a"), (b"X-Tag", b"b")]) == "h"


def test_all_headers_must_match() -> None:
    table = router(route("h", headers={"x-a": "1", "x-b": "2"}))
    assert winner(table, "/", headers=[(b"x-a", b"1"), (b"x-b", b"2")]) == "h"
    assert winner(table, "/", headers=[(b"x-a", b"1")]) is None


@pytest.mark.parametrize(
    ("query", "hit"),
    [
        ("v=2", True),
        ("a=1&v=2", True),
        ("v=1&v=2", True),  # a repeated parameter: any occurrence
        ("v=3", False),
        ("", False),
        ("x=2", False),
    ],
)
def test_query_exact_value(query: str, hit: bool) -> None:
    assert (winner(router(route("q", query={"v": "2"})), "/", query=query) == "q") is hit


def test_query_values_are_percent_decoded_and_may_be_blank() -> None:
    table = router(route("q", query={"name": ["a b", "~^caf\u00e9$"], "flag": ""}))
    assert winner(table, "/", query="name=a%20b&flag") == "q"
    assert winner(table, "/", query="name=caf%C3%A9&flag=") == "q"
    assert winner(table, "/", query="name=a+b") is None  # "flag" is absent


def test_query_and_headers_are_parsed_only_when_a_candidate_needs_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(_: object) -> dict[str, list[str]]:
        raise AssertionError("parsed without need")

    monkeypatch.setattr(table_module, "query_values", boom)
    monkeypatch.setattr(table_module, "header_values", boom)
    table = router(route("plain", paths=["/a"]), route("m", paths=["/b"], methods=["GET"]))
    assert winner(table, "/a", query="x=1", headers=[(b"x", b"1")]) == "plain"
    assert winner(table, "/b", query="x=1", headers=[(b"x", b"1")]) == "m"


# -- 405 and fall-through ----------------------------------------------------------------------------
def test_method_not_allowed_lists_the_union_of_methods() -> None:
    table = router(
        route("get", paths=["=/x"], methods=["GET", "HEAD"]), route("post", paths=["/x"], methods=["POST"])
    )
    assert match(table, "/x", method="DELETE") == MethodNotAllowed(("GET", "HEAD", "POST"))
    assert winner(table, "/x", method="POST") == "post"


def test_a_route_failing_on_more_than_the_method_is_not_in_allow() -> None:
    table = router(
        route("get", paths=["/x"], methods=["GET"]),
        route("put", paths=["/x"], methods=["PUT"], headers={"x-admin": "1"}),
    )
    assert match(table, "/x", method="DELETE") == MethodNotAllowed(("GET",))
    assert match(router(route("put", paths=["/x"], methods=["PUT"], headers={"x-admin": "1"})), "/x") is None


def test_a_lower_ranked_route_that_allows_the_method_wins_over_405() -> None:
    table = router(route("get", paths=["=/x"], methods=["GET"]), route("any", paths=["/"]))
    assert winner(table, "/x", method="POST") == "any"


def test_candidate_failing_a_header_falls_through_to_the_next() -> None:
    table = router(route("canary", paths=["/api"], headers={"x-canary": "1"}), route("main", paths=["/api"]))
    assert winner(table, "/api", headers=[(b"x-canary", b"1")]) == "canary"
    assert winner(table, "/api", headers=[(b"x-canary", b"0")]) == "main"


# -- precedence ----------------------------------------------------------------------------------------
def test_rule1_priority_beats_every_other_rule() -> None:
    table = router(
        route("specific", hosts=["api.example.com"], paths=["=/x"], methods=["GET"]),
        route("urgent", paths=["/"], priority=1),
    )
    assert winner(table, "/x", host="api.example.com") == "urgent"


def test_rule1_negative_priority_loses_to_default() -> None:
    table = router(route("low", paths=["=/x"], priority=-1), route("normal", paths=["/"]))
    assert winner(table, "/x") == "normal"


def test_rule2_exact_host_beats_wildcard_beats_no_host() -> None:
    table = router(
        route("none", paths=["/"]),
        route("wild", hosts=["*.example.com"], paths=["/"]),
        route("exact", hosts=["api.example.com"], paths=["/"]),
    )
    assert winner(table, "/", host="api.example.com") == "exact"
    assert winner(table, "/", host="www.example.com") == "wild"
    assert winner(table, "/", host="example.org") == "none"


def test_rule2_wildcard_with_more_literal_labels_first() -> None:
    table = router(
        route("short", hosts=["*.example.com"]),
        route("long", hosts=["*.api.example.com"]),
        route("trail", hosts=["api.example.*"]),
    )
    assert winner(table, "/", host="v1.api.example.com") == "long"
    assert winner(table, "/", host="www.example.com") == "short"
    assert winner(table, "/", host="api.example.org") == "trail"


def test_rule2_host_outranks_path() -> None:
    table = router(route("path", paths=["=/login"]), route("host", hosts=["api.example.com"], paths=["/"]))
    assert winner(table, "/login", host="api.example.com") == "host"
    assert winner(table, "/login", host="other.example.com") == "path"


def test_rule3_path_kinds_in_order() -> None:
    routes = [
        route("none", methods=["GET"]),
        route("regex", paths=["~^/users"]),
        route("prefix", paths=["/users/"]),
        route("template", paths=["/users/{id}"]),
        route("exact", paths=["=/users/7"]),
    ]
    for index in range(len(routes)):
        table = router(*routes[: index + 1])  # the last one added is the most specific kind so far
        assert winner(table, "/users/7") == routes[index].name


def test_rule3_more_literal_segments_first_and_catch_all_last() -> None:
    table = router(
        route("catch_all", paths=["/a/{rest*}"]),
        route("one_literal", paths=["/a/{x}/{y}"]),
        route("two_literals", paths=["/a/{x}/c"]),
        route("two_literals_catch_all", paths=["/a/b/{rest*}"]),
    )
    assert winner(table, "/a/b/c") == "two_literals"
    assert winner(table, "/a/b/d") == "two_literals_catch_all"  # 2 literals beat 1
    assert winner(table, "/a/z/d") == "one_literal"
    assert winner(table, "/a/z/d/e") == "catch_all"


def test_rule3_catch_all_ranks_after_fixed_template_with_same_literals() -> None:
    table = router(route("rest", paths=["/files/{rest*}"]), route("one", paths=["/files/{name}"]))
    assert winner(table, "/files/a") == "one"
    assert winner(table, "/files/a/b") == "rest"


def test_rule3_longer_prefix_first() -> None:
    table = router(
        route("short", paths=["/api"]), route("long", paths=["/api/v1/"]), route("mid", paths=["/api/"])
    )
    assert winner(table, "/api/v1/x") == "long"
    assert winner(table, "/api/v2") == "mid"
    assert winner(table, "/apix") == "short"


def test_rule3_regexes_in_config_order_even_against_more_matchers() -> None:
    table = router(route("first", paths=["~^/a"]), route("second", paths=["~^/a/b"], methods=["GET"]))
    assert winner(table, "/a/b") == "first"


def test_rule4_more_matchers_first() -> None:
    table = router(
        route("none", paths=["/api"]),
        route("method", paths=["/api"], methods=["GET"]),
        route("two", paths=["/api"], methods=["GET"], headers={"x-a": "1"}),
        route("three", paths=["/api"], headers={"x-a": "1", "x-b": "2"}, query={"q": "1"}),
    )
    assert winner(table, "/api", query="q=1", headers=[(b"x-a", b"1"), (b"x-b", b"2")]) == "three"
    assert winner(table, "/api", headers=[(b"x-a", b"1")]) == "two"
    assert winner(table, "/api") == "method"
    assert winner(table, "/api", method="POST") == "none"


def test_rule5_config_order_breaks_ties() -> None:
    table = router(route("first", paths=["/api"]), route("second", paths=["/api"]))
    assert winner(table, "/api") == "first"


def test_each_variant_of_a_route_is_ranked_on_its_own() -> None:
    # One route, two paths: the exact one outranks the other route's prefix, the prefix does not.
    table = router(route("both", paths=["/b", "=/a"]), route("prefix", paths=["/a"]))
    assert winner(table, "/a") == "both"
    assert winner(table, "/ab") == "prefix"


# -- properties ------------------------------------------------------------------------------------------
_segment = st.text(alphabet="abcxyz019-_.~", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=4).map(lambda segments: "/" + "/".join(segments))


@given(st.lists(_paths, min_size=1, max_size=30, unique=True))
def test_every_exact_route_matches_itself(paths: list[str]) -> None:
    table = Router([(route(f"r{i}", paths=["=" + path]), path) for i, path in enumerate(paths)])
    for path in paths:
        assert forwarded_route(table, path) == path


@given(st.lists(_paths, min_size=1, max_size=30, unique=True), _paths)
def test_longest_matching_prefix_wins(prefixes: list[str], path: str) -> None:
    table = Router([(route(f"r{i}", paths=[prefix]), prefix) for i, prefix in enumerate(prefixes)])
    matching = [prefix for prefix in prefixes if path.startswith(prefix)]
    assert forwarded_route(table, path) == (max(matching, key=len) if matching else None)


def forwarded_route(table: Router[str], path: str) -> str | None:
    found = table.match("GET", "", path, "", [])
    assert not isinstance(found, MethodNotAllowed)
    return found.route if found is not None else None
