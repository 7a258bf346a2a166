"""Which plugins exist, and validation of their configuration at load time.

A plugin instance names its plugin one of three ways:
  - a built-in plugin by name: ``key-auth``
  - a user plugin by import path: ``my_company.plugins:Canary`` (module, colon, class)
  - a user plugin by entry point name, in the group ``tollway.plugins`` of an installed package

Validation (`check_config_plugins`, the `PluginCheck` the runtime and the CLI hand to
tollway.config.loader) runs when a configuration is loaded (`tollway check`, `run`, a reload): every
instance's config against its plugin's schema, consumers' credentials against the authentication
plugins' credential schemas, scoping rules, and `plugin_order`. Errors name the entity,
the plugin and the field: ``routes[2] "users": plugins[0] "key-auth": config.key_names[0]: ...``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from tollway.config.wording import did_you_mean
from tollway.plugins.base import Plugin

if TYPE_CHECKING:  # the loader (and YAML) only when a config is checked: a worker never does (~2.5 MB)
    from tollway.config.loader import Loc, PluginCheck
    from tollway.config.schema import GatewayConfig

ENTRY_POINT_GROUP = "tollway.plugins"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

# name -> "module:Class" of the built-in plugins (imported only when a config uses them).
BUILTIN: dict[str, str] = {
    "correlation-id": "tollway.plugins.builtin.correlation_id:CorrelationId",
    "cors": "tollway.plugins.builtin.cors:Cors",
    "key-auth": "tollway.plugins.builtin.key_auth:KeyAuth",
    "basic-auth": "tollway.plugins.builtin.basic_auth:BasicAuth",
    "jwt": "tollway.plugins.builtin.jwt:JwtAuth",
    "mtls-auth": "tollway.plugins.builtin.mtls_auth:MtlsAuth",
    "https-policy": "tollway.plugins.builtin.https_policy:HttpsPolicy",
    "acl": "tollway.plugins.builtin.acl:Acl",
    "ip-restriction": "tollway.plugins.builtin.ip_restriction:IpRestriction",
    "request-size-limit": "tollway.plugins.builtin.request_size_limit:RequestSizeLimit",
    "request-transformer": "tollway.plugins.builtin.request_transformer:RequestTransformer",
    "response-transformer": "tollway.plugins.builtin.response_transformer:ResponseTransformer",
    "rate-limiting": "tollway.plugins.builtin.rate_limiting:RateLimiting",
    "concurrency-limit": "tollway.plugins.builtin.concurrency_limit:ConcurrencyLimit",
    "proxy-cache": "tollway.plugins.builtin.proxy_cache:ProxyCache",
}


class PluginLoadError(Exception):
    """A plugin reference that does not resolve to a usable plugin class."""


_RESOLVED: dict[str, type[Plugin[Any]]] = {}


def resolve(reference: str) -> type[Plugin[Any]]:
    """The plugin class a config's `name` refers to, or PluginLoadError saying why not."""
    cls = _RESOLVED.get(reference)
    if cls is None:
        cls = _load(reference)
        _RESOLVED[reference] = cls
    return cls


def _load(reference: str) -> type[Plugin[Any]]:
    target = BUILTIN.get(reference)
    if target is None and ":" in reference:
        target = reference
    if target is None:
        target = _entry_point(reference)
    if target is None:
        installed = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
        close = did_you_mean(reference, [*BUILTIN, *installed])
        if close:
            raise PluginLoadError(f"unknown plugin {reference!r}{close}")
        raise PluginLoadError(
            f"unknown plugin {reference!r} (not built in, not an entry point in group {ENTRY_POINT_GROUP!r}; "
            'a plugin in your own module is named "package.module:Class")'
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or the module itself failing: say which
        raise PluginLoadError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, attribute, None)
    if not isinstance(cls, type) or not issubclass(cls, Plugin):
        raise PluginLoadError(f"{target!r} is not a subclass of tollway.plugins.Plugin")
    if not _NAME.match(cls.name or ""):
        raise PluginLoadError(f'{target!r} needs a kebab-case `name` class attribute, e.g. "my-plugin"')
    if not isinstance(cls.priority, int):
        raise PluginLoadError(f"{target!r}: `priority` must be an integer")
    return cls


def _entry_point(name: str) -> str | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return str(ep.value)
    return None


def canonical_name(reference: str) -> str:
    """A reference's plugin name (``pkg.mod:Class`` → its `name`); the reference itself if unresolved."""
    try:
        return resolve(reference).name
    except PluginLoadError:
        return reference


# -- validation ---------------------------------------------------------------------------------------
def check_config_plugins(
    config: GatewayConfig, instances: Iterable[tuple[Loc, Any, bool]]
) -> Iterator[tuple[Loc, str]]:
    """Yield (location, message) for every problem with plugins, credentials and plugin_order."""
    seen_scopes: dict[tuple[str, str | None, str | None, str | None], Loc] = {}
    for loc, instance, _top_level in instances:
        try:
            cls = resolve(instance.name)
        except PluginLoadError as exc:
            yield (*loc, "name"), str(exc)
            continue
        yield from _check_instance(config, loc, instance, cls)
        scope = (cls.name, *_scope_of(config, loc, instance))
        if scope in seen_scopes:
            yield (*loc, "name"), f"{cls.name!r} is configured twice for the same scope"
        seen_scopes[scope] = loc
    yield from _check_credentials(config)
    yield from _check_plugin_order(config)


def _check_instance(
    config: GatewayConfig, loc: Loc, instance: Any, cls: type[Plugin[Any]]
) -> Iterator[tuple[Loc, str]]:
    try:
        conf = cls.config_model.model_validate(instance.config)
    except ValidationError as exc:
        for issue_loc, message in _validation_issues(exc, instance.config, cls.config_model):
            yield (*loc, "config", *issue_loc), message
        return
    if _scope_of(config, loc, instance)[2] is not None and not cls.consumer_scoped:
        yield (*loc, "name"), f"{cls.name!r} cannot be configured per consumer"
    for issue_loc, message in cls.check(conf, config):
        yield (*loc, "config", *issue_loc), message


def _scope_of(config: GatewayConfig, loc: Loc, instance: Any) -> tuple[str | None, str | None, str | None]:
    """(route, service, consumer) an instance applies to."""
    if loc[0] == "plugins":
        return instance.route, instance.service, instance.consumer
    kind, index = loc[0], loc[1]
    assert isinstance(index, int)
    if kind == "routes":
        return config.routes[index].name, None, None
    if kind == "services":
        return None, config.services[index].name, None
    return None, None, config.consumers[index].username


def _validation_issues(exc: ValidationError, data: Any, model: Any) -> Iterator[tuple[Loc, str]]:
    from tollway.config.loader import validation_issues

    return validation_issues(exc, data, model)


def check_plugin_document(plugin: dict[str, Any]) -> Iterator[tuple[Loc, str]]:
    """A raw plugin instance (`{name, config}` from the document): its name resolves and its options
    fit its schema. For files whose other errors keep the whole config from validating."""
    name = plugin.get("name")
    if not isinstance(name, str):
        return
    try:
        cls = resolve(name)
    except PluginLoadError as exc:
        yield ("name",), str(exc)
        return
    options = plugin.get("config", {})
    if not isinstance(options, dict):
        return  # the schema reports a config that is not a mapping
    try:
        cls.config_model.model_validate(options)
    except ValidationError as exc:
        for issue_loc, message in _validation_issues(exc, options, cls.config_model):
            yield ("config", *issue_loc), message


def _configured_classes(config: GatewayConfig) -> dict[str, type[Plugin[Any]]]:
    """The configured plugins by their own names (a plugin loaded by import path has a short name too)."""
    found: dict[str, type[Plugin[Any]]] = {}
    for instance in _all_instances(config):
        try:
            cls = resolve(instance.name)
        except PluginLoadError:
            continue
        found[cls.name] = cls
    return found


def _check_credentials(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    """Credentials are keyed like a plugin instance's name, or by the plugin's own name."""
    configured = _configured_classes(config)
    owners: dict[tuple[str, Any], str] = {}  # (plugin, identity) -> consumer: identities must be unique
    for i, consumer in enumerate(config.consumers):
        for plugin_name, items in consumer.credentials.items():
            loc: Loc = ("consumers", i, "credentials", plugin_name)
            cls = configured.get(plugin_name)
            if cls is None:
                try:
                    cls = resolve(plugin_name)
                except PluginLoadError as exc:
                    yield loc, str(exc)
                    continue
            model = cls.consumer_credential
            if model is None:
                yield loc, f"plugin {cls.name!r} takes no credentials"
                continue
            for j, raw in enumerate(items):
                try:
                    credential = model.model_validate(raw)
                except ValidationError as exc:
                    for issue_loc, message in _validation_issues(exc, raw, model):
                        yield (*loc, j, *issue_loc), message
                    continue
                identity = getattr(credential, "identity", None)
                if identity is None:
                    continue
                key = (cls.name, identity() if callable(identity) else identity)
                if key in owners:
                    yield (*loc, j), f"the same credential is already given to consumer {owners[key]!r}"
                owners[key] = consumer.username


def _check_plugin_order(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    """Entries name a plugin the way an instance does, or by the plugin's own name."""
    configured = set(_configured_classes(config))
    for i, route in enumerate(config.routes):
        if not route.plugin_order:
            continue
        seen: set[str] = set()
        for j, reference in enumerate(route.plugin_order):
            name = reference
            if reference not in configured:
                try:
                    name = resolve(reference).name
                except PluginLoadError as exc:
                    yield ("routes", i, "plugin_order", j), str(exc)
                    continue
            if name in seen:
                yield ("routes", i, "plugin_order", j), f"{name!r} is listed twice"
            seen.add(name)


def _all_instances(config: GatewayConfig) -> Iterator[Any]:
    yield from config.plugins
    entities: list[Any] = [*config.services, *config.routes, *config.consumers]
    for entity in entities:
        yield from entity.plugins


# What the runtime and the CLI hand to tollway.config.loader (checked against its protocol here).
class _RegistryCheck:
    """The `PluginCheck` the application hands to the config loader: this registry's two checks."""

    check_config = staticmethod(check_config_plugins)
    check_document = staticmethod(check_plugin_document)


PLUGIN_CHECK: PluginCheck = _RegistryCheck()
