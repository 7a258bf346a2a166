"""Request path normalization and path-pattern compilation."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tollway.router import normalize_path
from tollway.router.paths import compile_rewrite, parse_path_pattern


@pytest.mark.parametrize("path", ["/", "/api/users/7", "/a-b_c~d/e.f", "/v1/x;y=z", "/a/b/"])
def test_fast_path_returns_the_same_object(path: str) -> None:
    assert normalize_path(path) is path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/admin/../public", "/public"),
        ("/../a", "/a"),
        ("/../../a/b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/a/b/../../..", "/"),
        ("/a/b/../", "/a/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/..b/c.", "/a/..b/c."),
    ],
)
def test_dot_segments_are_removed(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/%2e%2e/admin", "/admin"),
        ("/a/%2E%2E/admin", "/admin"),
        ("/a/.%2e/admin", "/admin"),
        ("/a/%2e/b", "/a/b"),
        ("/%61dmin", "/admin"),
        ("/%7Euser", "/~user"),
        ("/a%2D%5F", "/a-_"),
    ],
)
def test_unreserved_escapes_are_decoded_before_dot_segments(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a%2fb", "/a%2Fb"),  # an encoded slash is data, not a separator
        ("/a/..%2f..%2fadmin", "/a/..%2F..%2Fadmin"),  # so it cannot form dot-segments either
        ("/a%20b", "/a%20b"),
        ("/a%3ab", "/a%3Ab"),
        ("/%25", "/%25"),
        ("/%252e%252e/x", "/%252e%252e/x"),  # one decoding round only
        ("/caf%c3%a9", "/caf%C3%A9"),
    ],
)
def test_other_escapes_stay_encoded_with_uppercase_hex(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("//a", "/a"),
        ("/a//b///c", "/a/b/c"),
        ("/a//", "/a/"),
        ("//", "/"),
        ("/a//../b", "/b"),
        ("/a/.//b", "/a/b"),
    ],
)
def test_repeated_slashes_are_merged(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/a%g1", "/%%41", "/a%2/b"])
def test_bad_escape_is_invalid(raw: str) -> None:
    assert normalize_path(raw) is None


@pytest.mark.parametrize("raw", ["", "a/b", "*", "http://example.com/x", "%2Fa", ".."])
def test_path_must_start_with_a_slash(raw: str) -> None:
    assert normalize_path(raw) is None


_raw_paths = st.text(alphabet="/.%2eEfF4a1b~-_ ", max_size=30).map(lambda s: "/" + s)


@given(_raw_paths)
@example("/%2e%2e/%2E")
@example("/a%2F..%2F/.%2e//b")
def test_normalize_is_idempotent_and_yields_a_normal_path(raw: str) -> None:
    path = normalize_path(raw)
    if path is None:
        return
    assert normalize_path(path) == path
    assert path.startswith("/")
    assert "//" not in path
    assert not any(segment in (".", "..") for segment in path.split("/"))


# -- patterns and rewrites ---------------------------------------------------------------------------
def test_pattern_kinds() -> None:
    assert parse_path_pattern("/api").kind == "prefix"
    assert parse_path_pattern("=/api").kind == "exact"
    assert parse_path_pattern("~^/v[0-9]").kind == "regex"
    template = parse_path_pattern("/a/{x}/b/{rest*}")
    assert (template.kind, template.segments, template.catch_all, template.literals) == (
        "template",
        ("a", "{x}", "b"),
        "rest",
        2,
    )


def test_pattern_literals_get_escape_normalization() -> None:
    assert parse_path_pattern("=/%7euser%2f").text == "/~user%2F"
    assert parse_path_pattern("~/%7e").text == "/%7e"  # a regex is the user's own business
    assert parse_path_pattern("/a%zz").text == "/a%zz"  # malformed: left alone, matches nothing


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/v2/users/{id}", "/v2/users/{id}"),
        ("/static/{rest*}", "/static/{rest}"),
        ("/a/{x", "/a/{{x"),
        ("/a}/{b}", "/a}}/{b}"),
    ],
)
def test_compile_rewrite(template: str, expected: str) -> None:
    assert compile_rewrite(template) == expected
