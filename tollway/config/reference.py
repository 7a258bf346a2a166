"""Generates docs/configuration.md from the schema, so the reference cannot drift from the code.

    python -m tollway.config.reference > docs/configuration.md

A unit test fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tollway.config.schema import GatewayConfig

INTRO = """\
# Configuration reference

A configuration is one YAML (or JSON) file: node settings under `gateway:`, then the entities —
`services` (where traffic goes), `routes` (which requests go there), `upstreams` (named groups of
targets), `consumers` (who is calling) and `plugins` (what happens on the way). `tollway check FILE`
validates a file and prints every error with its line, entity and field.

Durations are seconds or strings such as `"250ms"`, `"5s"`, `"2m"`, `"1h"`; sizes are bytes or strings
such as `"64k"`, `"10mb"`. Unknown fields are errors, so a typo never passes silently.

Reloading (SIGHUP, or saving the file while `watch_interval` is on) applies everything except
`gateway.listen`, `gateway.status_listen`, `gateway.workers` and `gateway.backlog`, which need a
restart. Limits and client timeouts apply to connections opened after the reload. A reload never
applies an empty file, nor one without routes unless it sets `gateway.allow_empty_routes: true`;
replace the file atomically (write a new file, then rename it over the old one) so a reload never
reads it half-written (docs/operations.md).

This file is generated from the schema (`python -m tollway.config.reference`); plugin options are
documented with each plugin in [docs/plugins](plugins/).
"""

# Models documented as their own section, in this order, with the path users write them at.
SECTIONS: list[tuple[str, str]] = [
    ("gateway", "GatewaySettings"),
    ("gateway.limits", "Limits"),
    ("gateway.timeouts", "Timeouts"),
    ("gateway.access_log", "AccessLog"),
    ("gateway.metrics", "Metrics"),
    ("gateway.tracing", "Tracing"),
    ("gateway.dns", "DnsSettings"),
    ("gateway.forwarded_headers", "ForwardedHeaders"),
    ("gateway.store", "StoreSettings"),
    ("services[]", "Service"),
    ("routes[]", "Route"),
    ("upstreams[]", "Upstream"),
    ("upstreams[].targets[]", "Target"),
    ("upstreams[].healthchecks", "Healthchecks"),
    ("upstreams[].healthchecks.active", "ActiveHealthcheck"),
    ("upstreams[].healthchecks.passive", "PassiveHealthcheck"),
    ("upstreams[].retries", "Retries"),
    ("upstreams[].retries.budget", "RetryBudget"),
    ("upstreams[].retries.backoff", "Backoff"),
    ("upstreams[].circuit_breaker", "CircuitBreaker"),
    ("upstreams[].pool", "PoolOptions"),
    ("upstreams[].dns", "UpstreamDns"),
    ("consumers[]", "Consumer"),
    ("plugins[] (and plugins: inside services, routes, consumers)", "PluginInstance"),
    # TLS (tollway.config.tls, docs/tls.md)
    ("gateway.tls", "ListenerTls"),
    ("gateway.tls.client_auth", "ClientAuth"),
    ("certificates[]", "Certificate"),
    ("certificates[].client_auth", "ClientCas"),
    ("services[].tls, upstreams[].tls", "UpstreamTls"),
]


def generate() -> str:
    models = _collect_models(GatewayConfig)
    out = [INTRO]
    documented = set()
    for path, name in SECTIONS:
        model = models.get(name)
        if model is None:
            continue
        documented.add(name)
        out.append(_section(path, model))
    for name, model in sorted(models.items()):  # models added later (by features) still appear
        if name not in documented and name != "GatewayConfig":
            out.append(_section(_path_hint(name), model))
    return "\n".join(out).rstrip() + "\n"


def _section(path: str, model: type[BaseModel]) -> str:
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"## `{path}`", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = _annotated_name(field.metadata) or _type_name(field.annotation)
        lines.append(f"| `{name}` | {kind} | {_default(field)} | {_describe(field)} |")
    return "\n".join(lines) + "\n"


def _collect_models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    stack = [root]
    while stack:
        model = stack.pop()
        if model.__name__ in found:
            continue
        found[model.__name__] = model
        for field in model.model_fields.values():
            stack.extend(_models_in(field.annotation))
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _annotated_name(args[1:]) or _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Any": "any"}.get(
            annotation.__name__, annotation.__name__
        )
    return "any"


def _annotated_name(metadata: Any) -> str:
    """Our value types (config.types) are Annotated with a validator whose name says what they are."""
    for meta in metadata:
        func = getattr(meta, "func", None)
        name = getattr(func, "__name__", "")
        if name == "parse_duration":
            return "duration"
        if name == "parse_size":
            return "size"
        if name in ("check_listen",):
            return "host:port"
        if name == "check_traffic_listen":
            return 'host:port, optionally followed by "tls" or "mtls"'
        if name == "_check_sni":
            return "host name or *.wildcard"
        if name == "check_cidr":
            return "IP or CIDR"
    return ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{json.dumps(value)}`" if value not in ([], {}) else "empty"


def _describe(field: FieldInfo) -> str:
    text = field.description or ""
    return text.replace("|", "\\|")


def _path_hint(name: str) -> str:
    return name


if __name__ == "__main__":
    sys.stdout.write(generate())
