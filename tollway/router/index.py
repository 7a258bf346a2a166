"""The path index of one host group: every path pattern of the routes that share a host pattern.

Theory of operation. A request path is looked up in five structures, each with a cost that depends on
the path (its length in segments), not on the number of routes:

- exact paths: one dict lookup;
- prefixes: a segment trie. A prefix "/s1/s2/tail" is stored at the node reached by s1, s2 with its
  partial last segment "tail" ("" for a prefix ending in "/"). Walking the request's segments down
  the trie visits every stored prefix of the path in one pass. At a node, the request's next segment
  is first looked up whole among the tails ("/svc7" and the request "/svc7/x": one lookup that
  returns "svc7" and the shorter tails it starts with, merged at build time); only when it is not a
  tail ("/svc7x") are the tails probed once per distinct tail length at that node. A flat "slice the
  path at every distinct prefix length" table would grow with log10(route count) for /svc0/ ...
  /svc9999/; this does not;
- templates: a segment trie with static children, one parameter child and catch-all entries. Only
  the branches that match are walked (static and parameter children can both match: both are kept);
- regular expressions: tried one by one, so their cost grows with their number (documented);
- routes without paths: always candidates.

Every hit is a *candidate* tuple ``(rank, entry, params, cut)``: `rank` orders candidates (lower
wins), `params` are the captured parameters and `cut` is where the forwarded path starts when
`strip_path` is on. Exact and prefix candidates are built once here, so matching them allocates
nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from tollway.router.paths import PathPattern, param_name

if TYPE_CHECKING:
    from tollway.router.table import RouteEntry

Candidate = tuple[int, "RouteEntry", dict[str, str], int]
EMPTY_PARAMS: Final[dict[str, str]] = {}  # shared by every match without parameters; never mutated


class PrefixNode:
    __slots__ = ("by_length", "children", "here", "tails", "whole")

    def __init__(self) -> None:
        self.children: dict[str, PrefixNode] = {}
        self.here: list[Candidate] = []  # prefixes ending with the "/" that leads to this node
        self.tails: dict[str, list[Candidate]] = {}  # prefixes ending inside the next segment
        # Frozen: tail -> its candidates and those of every shorter tail it starts with.
        self.whole: dict[str, list[Candidate]] = {}
        # Frozen: ((length, {tail: candidates}), ...) for a next segment that is not itself a tail.
        self.by_length: tuple[tuple[int, dict[str, list[Candidate]]], ...] = ()


# Shared empty containers of frozen prefix nodes (`_freeze_prefixes`): never mutated.
_NO_CHILDREN: dict[str, PrefixNode] = {}
_NO_CANDIDATES: list[Candidate] = []
_NO_TAILS: dict[str, list[Candidate]] = {}


class TemplateNode:
    __slots__ = ("ends", "param", "rests", "static")

    def __init__(self) -> None:
        self.static: dict[str, TemplateNode] = {}
        self.param: TemplateNode | None = None
        # Templates ending here: (rank, entry, param names in order).
        self.ends: list[tuple[int, RouteEntry, tuple[str, ...]]] = []
        # Catch-alls {rest*} hanging here: (rank, entry, param names, catch-all name).
        self.rests: list[tuple[int, RouteEntry, tuple[str, ...], str]] = []


class PathIndex:
    """All path patterns of one host group. Built with `add`, then `freeze`, then `collect` per request."""

    __slots__ = ("any_path", "exact", "prefixes", "regexes", "templates")

    def __init__(self) -> None:
        self.exact: dict[str, list[Candidate]] | None = None
        self.prefixes: PrefixNode | None = None
        self.templates: TemplateNode | None = None
        self.regexes: list[tuple[re.Pattern[str], int, RouteEntry]] | None = None
        self.any_path: list[Candidate] | None = None

    # -- build ------------------------------------------------------------------------------------
    def add(self, pattern: PathPattern | None, rank: int, entry: RouteEntry) -> None:
        if pattern is None:
            self.any_path = self.any_path or []
            self.any_path.append((rank, entry, EMPTY_PARAMS, 0))
        elif pattern.kind == "exact":
            self.exact = self.exact or {}
            self.exact.setdefault(pattern.text, []).append((rank, entry, EMPTY_PARAMS, len(pattern.text)))
        elif pattern.kind == "prefix":
            self.prefixes = self.prefixes or PrefixNode()
            # Cut a "/"-ended prefix before its slash: the stripped rest then starts with "/" already.
            cut = len(pattern.text) - pattern.text.endswith("/")
            _add_prefix(self.prefixes, pattern.text, (rank, entry, EMPTY_PARAMS, cut))
        elif pattern.kind == "template":
            self.templates = self.templates or TemplateNode()
            _add_template(self.templates, pattern, rank, entry)
        else:
            self.regexes = self.regexes or []
            self.regexes.append((re.compile(pattern.text), rank, entry))

    def freeze(self) -> None:
        """Sort every candidate list by rank, so a single hit list is already in order."""
        for hits in (self.exact or {}).values():
            hits.sort(key=_rank)
        if self.prefixes is not None:
            _freeze_prefixes(self.prefixes)
        if self.any_path is not None:
            self.any_path.sort(key=_rank)

    @property
    def needs_segments(self) -> bool:
        return self.prefixes is not None or self.templates is not None

    # -- match ------------------------------------------------------------------------------------
    def collect(self, path: str, segments: list[str], out: list[Candidate]) -> None:
        """Append every candidate whose path pattern matches `path` (split as `segments`) to `out`."""
        # Hot path: the common lookups are inlined here rather than delegated, to save calls.
        if self.exact is not None:
            hits = self.exact.get(path)
            if hits is not None:
                out.extend(hits)
        node = self.prefixes
        if node is not None:
            # The prefix trie walk (see the module docstring), inlined: it runs on most requests.
            # segments[0] is "" and segments[depth + 1] is the text after the "/" that led to the node
            # at `depth`, so it always exists; a node is entered only if a "/" follows its segment.
            last = len(segments) - 1
            depth = 0
            while True:
                if node.here:
                    out.extend(node.here)
                if node.whole:
                    following = segments[depth + 1]
                    hits = node.whole.get(following)
                    if hits is not None:
                        out.extend(hits)
                    else:
                        for length, table in node.by_length:
                            hits = table.get(following[:length])
                            if hits is not None:
                                out.extend(hits)
                depth += 1
                if depth >= last:
                    break
                node = node.children.get(segments[depth])
                if node is None:
                    break
        templates = self.templates
        # Enter the template trie only if its root can match: most paths miss it at the first segment.
        if templates is not None and (
            templates.param is not None or templates.rests or segments[1] in templates.static
        ):
            _collect_templates(templates, path, segments, 1, [], out)
        if self.regexes is not None:
            for regex, rank, entry in self.regexes:
                found = regex.match(path)
                if found is not None:
                    out.append(_regex_candidate(found, rank, entry))
        if self.any_path is not None:
            out.extend(self.any_path)


def _rank(candidate: Candidate) -> int:
    return candidate[0]


# -- prefixes ------------------------------------------------------------------------------------------
def _add_prefix(root: PrefixNode, prefix: str, candidate: Candidate) -> None:
    *segments, tail = prefix.split("/")[1:]
    node = root
    for segment in segments:
        node = node.children.setdefault(segment, PrefixNode())
    if tail:
        node.tails.setdefault(tail, []).append(candidate)
    else:
        node.here.append(candidate)


def _freeze_prefixes(node: PrefixNode) -> None:
    node.here.sort(key=_rank)
    by_length: dict[int, dict[str, list[Candidate]]] = {}
    for tail, hits in node.tails.items():
        hits.sort(key=_rank)
        by_length.setdefault(len(tail), {})[tail] = hits
        # Every tail that this tail starts with (itself included): at most len(tail) probes.
        shorter = (node.tails.get(tail[:length], []) for length in range(1, len(tail) + 1))
        node.whole[tail] = sorted((hit for hits in shorter for hit in hits), key=_rank)
    node.by_length = tuple(sorted(by_length.items()))
    for child in node.children.values():
        _freeze_prefixes(child)
    # Most nodes are leaves ("/svc7/" is a leaf under the root): their empty containers become shared
    # ones, never changed once frozen (10,000 prefix routes: ~2 MB less).
    if not node.children:
        node.children = _NO_CHILDREN
    if not node.here:
        node.here = _NO_CANDIDATES
    if not node.tails:
        node.tails = node.whole = _NO_TAILS


# -- templates -----------------------------------------------------------------------------------------
def _add_template(root: TemplateNode, pattern: PathPattern, rank: int, entry: RouteEntry) -> None:
    node = root
    names = []
    for segment in pattern.segments:
        name = param_name(segment)
        if name is None:
            node = node.static.setdefault(segment, TemplateNode())
        else:
            names.append(name)
            node.param = node.param or TemplateNode()
            node = node.param
    if pattern.catch_all is None:
        node.ends.append((rank, entry, tuple(names)))
    else:
        node.rests.append((rank, entry, tuple(names), pattern.catch_all))


def _collect_templates(
    node: TemplateNode, path: str, segments: list[str], pos: int, values: list[str], out: list[Candidate]
) -> None:
    # pos indexes the next unconsumed segment; values holds the parameter segments consumed so far.
    # A loop down the trie; recursion only where both a static child and the parameter child match.
    last = len(segments)
    while True:
        if node.rests:
            _collect_rests(node, path, segments, pos, values, out)
        if pos == last:
            for rank, entry, names in node.ends:
                out.append((rank, entry, _params(names, values), len(path)))
            return
        segment = segments[pos]
        pos += 1
        child = node.static.get(segment)
        param = node.param if segment else None  # a parameter is never empty: /users/{id} != /users/
        if param is None:
            if child is None:
                return
            node = child
            continue
        if child is not None:
            depth = len(values)
            _collect_templates(child, path, segments, pos, values, out)
            del values[depth:]
        values.append(segment)
        node = param


def _params(names: tuple[str, ...], values: list[str]) -> dict[str, str]:
    # The one-parameter literal is 4x cheaper than dict(zip(...)), and is the usual case.
    if len(names) == 1:
        return {names[0]: values[0]}
    return dict(zip(names, values, strict=True)) if names else EMPTY_PARAMS


def _collect_rests(
    node: TemplateNode, path: str, segments: list[str], pos: int, values: list[str], out: list[Candidate]
) -> None:
    # The catch-all takes the rest without its leading "/"; strip_path cuts just before that "/".
    if pos < len(segments):
        rest = "/".join(segments[pos:])
        cut = len(path) - len(rest) - 1
    else:
        rest, cut = "", len(path)
    for rank, entry, names, rest_name in node.rests:
        params = dict(zip(names, values, strict=True)) if names else {}
        params[rest_name] = rest
        out.append((rank, entry, params, cut))


# -- regular expressions -------------------------------------------------------------------------------
def _regex_candidate(found: re.Match[str], rank: int, entry: RouteEntry) -> Candidate:
    # A named group that did not take part in the match captures "" (a rewrite may use it).
    return (rank, entry, found.groupdict("") or EMPTY_PARAMS, found.end())
