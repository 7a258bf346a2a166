"""Load a configuration file into a validated `GatewayConfig`, or fail with every problem and where it is.

Errors read ``config.yaml:14: routes[3] "users": paths[0]: must start with "/"``: the file line (from
the YAML node marks), the path through the document, and the name of the entity it belongs to, so a
user with 10,000 routes can find the one that is wrong.

Plugin configurations are checked by a `PluginCheck` the caller hands in (the application passes
`tollway.plugins.registry.check_config_plugins`): config is data at the bottom of the layers and imports
no plugin code. Without one, only the gateway's own schema and references are checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from tollway.config.schema import GatewayConfig
from tollway.config.tls import check_tls
from tollway.config.wording import did_you_mean, message
from tollway.errors import ConfigError

Loc = tuple[str | int, ...]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Entity lists whose items are named in error messages, and the field holding the name.
_ENTITY_NAME_FIELD = {
    "services": "name",
    "routes": "name",
    "upstreams": "name",
    "consumers": "username",
    "plugins": "name",
    "certificates": "name",
}


class PluginCheck(Protocol):
    """Checks plugin instances for the loader; each method yields (location, message) per problem."""

    def check_config(
        self, config: GatewayConfig, instances: Iterable[tuple[Loc, Any, bool]]
    ) -> Iterator[tuple[Loc, str]]:
        """Every plugin instance of a validated config. `instances` yields each with its location and
        whether it may name a scope (top level)."""
        ...

    def check_document(self, plugin: dict[str, Any]) -> Iterator[tuple[Loc, str]]:
        """One raw instance (`{name, config}`) of a document the schema rejected: its name resolves and
        its options fit, so an unknown plugin is reported with the other mistakes."""
        ...


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a configuration: where it is and what is wrong."""

    loc: Loc
    message: str


def load_file(path: str | Path, plugins: PluginCheck | None = None) -> GatewayConfig:
    """Read, parse and validate a YAML (or JSON) configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(["the file is not UTF-8 text"], str(path)) from exc
    return load_text(text, str(path), plugins)


def load_text(text: str, source: str = "<config>", plugins: PluginCheck | None = None) -> GatewayConfig:
    try:
        root, data = _parse(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(exc, source)], source) from exc
    lines = _line_map(root) if root is not None else {}
    duplicates = _duplicate_keys(root, data, source) if root is not None else []
    try:
        config = validate(data, source=source, lines=lines, plugins=plugins)
    except ConfigError as exc:
        raise ConfigError(by_line(duplicates + exc.issues, source), source) from None
    if duplicates:
        raise ConfigError(duplicates, source)
    return config


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers and duplicate keys) and the document built from it: one parse,
    not one for each."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else {})
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError, source: str) -> str:
    """A YAML syntax error at the line where the construct goes wrong: a `[` never closed on line 2 is
    only noticed on line 3, so the line that opened it is the one to name."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark, opened = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    context = getattr(exc, "context", None)
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    noticed = f"line {mark.line + 1}, column {mark.column + 1}"
    # Only for what YAML leaves open until it is closed ("[", "{", a quote): in block context the
    # problem line is the one to fix.
    unclosed = context is not None and ("flow" in context or "quoted" in context)
    if opened is not None and unclosed and opened.line < mark.line:
        return (
            f"{source}:{opened.line + 1}: invalid YAML: {problem} {context} that starts on this line "
            f"(noticed at {noticed})"
        )
    return f"{source}:{mark.line + 1}: invalid YAML: {problem} (column {mark.column + 1})"


def by_line(issues: list[str], source: str) -> list[str]:
    """Formatted issues in file order (those without a line last), each kind's order kept otherwise."""

    def line_of(issue: str) -> int:
        head = issue.removeprefix(f"{source}:").partition(":")[0]
        return int(head) if issue.startswith(f"{source}:") and head.isdigit() else 1 << 30

    return sorted(issues, key=line_of)


def validate(
    data: Any,
    source: str = "<config>",
    lines: dict[Loc, int] | None = None,
    plugins: PluginCheck | None = None,
) -> GatewayConfig:
    """Validate an already-parsed document (a dict, as from YAML, JSON or a config store)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections"], source)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        issues = _merge_union_errors(
            Issue(loc, message) for loc, message in validation_issues(exc, data, GatewayConfig)
        )
        # Every error at once: references and plugins are checked on the document even when entities
        # are invalid.
        known = {issue.loc for issue in issues}
        issues += [issue for issue in check_references(data) if issue.loc not in known]
        issues += [issue for issue in _check_plugin_documents(data, plugins) if issue.loc not in known]
        raise ConfigError(format_issues(issues, data, source, lines or {}), source) from None
    problems = list(check_references(data))
    problems += [Issue(loc, message) for loc, message in check_tls(config)]
    if plugins is not None:
        problems += [Issue(loc, msg) for loc, msg in plugins.check_config(config, _plugin_instances(config))]
    if problems:
        raise ConfigError(format_issues(problems, data, source, lines or {}), source)
    return config


# -- cross-entity checks ------------------------------------------------------------------------------
def check_references(config: GatewayConfig | dict[str, Any]) -> Iterator[Issue]:
    """What one entity's schema cannot know: unique names, and references between entities.

    Works on a validated config or on the raw document (where it skips what is malformed: the schema
    reports that), so a file with both kinds of errors gets all of them in one go."""
    data = config.model_dump() if isinstance(config, GatewayConfig) else config
    services = _names(data, "services", "name")
    upstreams = _names(data, "upstreams", "name")
    routes = _names(data, "routes", "name")
    consumers = _names(data, "consumers", "username")
    yield from _unique("services", services, "name")
    yield from _unique("routes", routes, "name")
    yield from _unique("upstreams", upstreams, "name")
    yield from _unique("consumers", consumers, "username")
    known_services, known_upstreams = set(services.values()), set(upstreams.values())
    for i, route in _items(data, "routes"):
        ref = route.get("service")
        if isinstance(ref, str) and ref not in known_services:
            hint = did_you_mean(ref, known_services)
            yield Issue(("routes", i, "service"), f"unknown service {ref!r}{hint}")
    for i, service in _items(data, "services"):
        ref = service.get("upstream")
        if isinstance(ref, str) and ref not in known_upstreams:
            hint = did_you_mean(ref, known_upstreams)
            yield Issue(("services", i, "upstream"), f"unknown upstream {ref!r}{hint}")
    scopes = {"route": set(routes.values()), "service": known_services, "consumer": set(consumers.values())}
    for i, plugin in _items(data, "plugins"):
        for field, known in scopes.items():
            ref = plugin.get(field)
            if isinstance(ref, str) and ref not in known:
                yield Issue(("plugins", i, field), f"unknown {field} {ref!r}{did_you_mean(ref, known)}")
    for kind in ("services", "routes", "consumers"):
        for i, entity in _items(data, kind):
            nested = entity.get("plugins")  # not `plugins`: that names the checker
            for j, plugin in enumerate(nested if isinstance(nested, list) else []):
                if isinstance(plugin, dict) and any(plugin.get(f) for f in ("route", "service", "consumer")):
                    yield Issue(
                        (kind, i, "plugins", j, "route"),
                        "route/service/consumer are only allowed on top-level plugins",
                    )


def _items(data: dict[str, Any], kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    entities = data.get(kind)
    for i, entity in enumerate(entities if isinstance(entities, list) else []):
        if isinstance(entity, dict):
            yield i, entity


def _names(data: dict[str, Any], kind: str, field: str) -> dict[int, str]:
    return {i: entity[field] for i, entity in _items(data, kind) if isinstance(entity.get(field), str)}


def _unique(kind: str, names: dict[int, str], field: str) -> Iterator[Issue]:
    seen: set[str] = set()
    for i, name in names.items():
        if name in seen:
            yield Issue((kind, i, field), f"duplicate {field} {name!r}")
        seen.add(name)


def _plugin_instances(config: GatewayConfig) -> Iterator[tuple[Loc, Any, bool]]:
    """Every plugin instance with its location; the flag says whether it may name a scope."""
    for i, plugin in enumerate(config.plugins):
        yield ("plugins", i), plugin, True
    for kind in ("services", "routes", "consumers"):
        for i, entity in enumerate(getattr(config, kind)):
            for j, plugin in enumerate(entity.plugins):
                yield (kind, i, "plugins", j), plugin, False


def _check_plugin_documents(data: dict[str, Any], plugins: PluginCheck | None) -> Iterator[Issue]:
    """Plugin names and options on the raw document, for a file the schema rejected: an unknown plugin
    is reported together with the other mistakes, not after they are fixed."""
    if plugins is None:
        return
    instances: list[tuple[Loc, dict[str, Any]]] = [(("plugins", i), p) for i, p in _items(data, "plugins")]
    for kind in ("services", "routes", "consumers"):
        for i, entity in _items(data, kind):
            nested = entity.get("plugins")  # not `plugins`: that names the checker
            for j, plugin in enumerate(nested if isinstance(nested, list) else []):
                if isinstance(plugin, dict):
                    instances.append(((kind, i, "plugins", j), plugin))
    for loc, plugin in instances:
        for issue_loc, text in plugins.check_document(plugin):
            yield Issue((*loc, *issue_loc), text)


# -- formatting -------------------------------------------------------------------------------------
def format_issues(issues: Iterable[Issue], data: Any, source: str, lines: dict[Loc, int]) -> list[str]:
    out = []
    for issue in issues:
        line = _nearest_line(lines, issue.loc)
        where = f"{source}:{line}" if line else source
        out.append(f"{where}: {describe_loc(data, issue.loc)}: {issue.message}")
    return by_line(out, source)


def describe_loc(data: Any, loc: Loc) -> str:
    """``("routes", 3, "paths", 0)`` → ``routes[3] "users": paths[0]``."""
    parts: list[str] = []
    node = data
    for depth, key in enumerate(loc):
        if isinstance(key, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{key}]"]
            node = node[key] if isinstance(node, list) and 0 <= int(key) < len(node) else None
            name = _entity_name(loc[depth - 1] if depth else None, node)
            if name is not None:
                parts[-1] += f" {name}:"
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    text = ".".join(parts).replace(":.", ": ")
    return text.rstrip(":") or "(top level)"


def _entity_name(kind: Any, node: Any) -> str | None:
    field = _ENTITY_NAME_FIELD.get(kind) if isinstance(kind, str) else None
    if field and isinstance(node, dict) and isinstance(node.get(field), str):
        return f'"{node[field]}"'
    return None


def validation_issues(exc: ValidationError, data: Any, model: Any = None) -> Iterator[tuple[Loc, str]]:
    """A pydantic error's problems in the loader's wording, located in `data` (for plugin schemas too);
    `model` (the validated class) lets an unknown field name its likely meaning."""
    for err in exc.errors():
        yield _clean_loc(data, err["loc"]), _clean_message(err, model)


def _clean_loc(data: Any, loc: Iterable[str | int]) -> Loc:
    """Keep only the parts of a pydantic location that index into the document (drop union tags)."""
    out: list[str | int] = []
    node = data
    for key in loc:
        # (Two branches, not one `or`: mypy types the index separately in each.)
        if isinstance(node, dict) and key in node:  # noqa: SIM114
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif isinstance(node, dict) and isinstance(key, str) and not _looks_like_type_tag(key):
            out.append(key)  # a missing required field
            node = None
            continue
        else:
            continue
        out.append(key)
    return tuple(out)


def _merge_union_errors(issues: Iterable[Issue]) -> list[Issue]:
    """A value that fits no member of a union gets one message, not one per member."""
    merged: dict[Loc, list[str]] = {}
    for issue in issues:
        merged.setdefault(issue.loc, []).append(issue.message)
    out: list[Issue] = []
    for loc, messages in merged.items():
        if len(messages) > 1 and all(m.startswith("must be ") for m in messages):
            alternatives = [m.removeprefix("must be ").partition(", not ")[0] for m in messages]
            messages = ["must be " + " or ".join(dict.fromkeys(alternatives))]
        out.extend(Issue(loc, m) for m in messages)
    return out


def _looks_like_type_tag(key: str) -> bool:
    return any(ch in key for ch in "[]()") or key in {"str", "int", "float", "bool", "list", "dict"}


def _clean_message(err: Any, model: Any = None) -> str:
    return message(err, model)


# -- YAML line numbers ----------------------------------------------------------------------------------
def _line_map(root: yaml.Node) -> dict[Loc, int]:
    lines: dict[Loc, int] = {}
    _walk(root, (), lines.__setitem__)
    return lines


def _walk(node: yaml.Node, loc: Loc, record: Callable[[Loc, int], None]) -> None:
    record(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            record((*loc, key), key_node.start_mark.line + 1)
            _walk(value_node, (*loc, key), record)
            record((*loc, key), key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), record)


def _duplicate_keys(root: yaml.Node, data: Any, source: str) -> list[str]:
    """YAML lets a later key silently replace an earlier one (a second `routes:` drops the first)."""
    found: list[str] = []

    def walk(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first:
                    where = describe_loc(data, (*loc, key))
                    replaced = f"duplicate key (it replaces the one on line {first[key]})"
                    found.append(f"{source}:{line}: {where}: {replaced}")
                else:
                    first[key] = line
                walk(value_node, (*loc, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    walk(root, ())
    return found


def _nearest_line(lines: dict[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None
