"""Request path normalization and the compile-time side of path patterns.

Everything here runs either once per request before routing (`normalize_path`) or once per config
version (pattern parsing, rewrite templates). The request-time matching itself lives in `index.py`.

Normalization exists for security: routes (and the plugins attached to them) are chosen by path, so
``/admin/../public``, ``/%61dmin`` and ``//admin`` must route exactly like the path a backend will
finally see. We follow RFC 3986 6.2.2 (case and percent-encoding normalization), 5.2.4 (dot-segment
removal) and nginx's ``merge_slashes``. Escapes of reserved characters stay encoded: ``%2F`` is data,
not a separator, and decoding it would let ``/a%2F..%2Fadmin`` smuggle a segment past the router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PathKind = Literal["exact", "prefix", "template", "regex"]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# A "%" not followed by two hex digits: such a path is malformed (400), never guessed at.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"//+")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\*?\}")


def normalize_path(raw: str) -> str | None:
    """Normalize a request path for routing; None if it is malformed (the proxy answers 400)."""
    # Fast path: almost every real request path is already normal, and this runs on every request.
    if "%" not in raw and "/." not in raw and "//" not in raw and raw[:1] == "/":
        return raw
    if raw[:1] != "/":
        return None
    path = normalize_escapes(raw) if "%" in raw else raw
    if path is None:
        return None
    if "//" in path:
        # Merge before removing dot-segments, as nginx does: "/a//../b" is "/b", not "/a/b".
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = remove_dot_segments(path)
    return path


def normalize_escapes(path: str) -> str | None:
    """Decode escapes of unreserved characters, uppercase the others; None on a malformed escape."""
    if _BAD_ESCAPE.search(path):
        return None
    return _ESCAPE.sub(_fix_escape, path)


def _fix_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: resolve "." and ".." (never above the root)."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    # "/a/b/.." is the directory "/a/", so a final dot-segment leaves a trailing slash.
    trailing = "/" if out and segments[-1] in (".", "..") else ""
    return "/" + "/".join(out) + trailing


# -- configured path patterns ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PathPattern:
    """One entry of a route's `paths`, classified. Built once per config version."""

    kind: PathKind
    text: str  # exact/prefix: the literal path; template: the template; regex: the expression
    segments: tuple[str, ...] = ()  # template only: segments after the leading "/"
    catch_all: str | None = None  # template only: the name of a final {name*}, if any
    literals: int = 0  # template only: number of literal segments (ranking)


def parse_path_pattern(pattern: str) -> PathPattern:
    """Classify a validated path pattern (see `tollway.config.schema.Route`)."""
    if pattern.startswith("~"):
        return PathPattern("regex", pattern[1:])
    exact = pattern.startswith("=")
    text = pattern[1:] if exact else pattern
    # Configured literals get the same escape normalization as requests, or "/%7Euser" could never
    # match the normalized request "/~user". (The schema refuses malformed escapes.)
    text = normalize_escapes(text) or text
    if "{" not in text:
        return PathPattern("exact" if exact else "prefix", text)
    # (The schema refuses "=/users/{id}": a template already matches exactly.)
    return _parse_template(text)


def _parse_template(text: str) -> PathPattern:
    segments = tuple(text.split("/")[1:])
    catch_all = None
    if segments and segments[-1].endswith("*}"):
        catch_all = segments[-1][1:-2]
        segments = segments[:-1]
    literals = sum(1 for segment in segments if not _is_param(segment))
    return PathPattern("template", text, segments, catch_all, literals)


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def param_name(segment: str) -> str | None:
    """The name in a "{name}" template segment, None for a literal segment."""
    return segment[1:-1] if _is_param(segment) else None


# -- forwarded path ----------------------------------------------------------------------------------
def compile_rewrite(template: str) -> str:
    """Turn "/v2/users/{id}" (or "{rest*}") into a `str.format_map` string; literal braces escaped."""
    pieces = []
    pos = 0
    for match in _PARAM.finditer(template):
        pieces.append(_escape_braces(template[pos : match.start()]))
        pieces.append("{" + match.group(1) + "}")
        pos = match.end()
    pieces.append(_escape_braces(template[pos:]))
    return "".join(pieces)


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
