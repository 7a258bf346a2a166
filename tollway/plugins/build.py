"""Compiles a configuration's plugin instances into one `Pipeline` per route, once per config version.

Scoping and precedence. An instance applies globally (top level, no scope), to a service, a route, a
consumer, or a combination (top-level instances naming `route`, `service` and/or `consumer`). For each
plugin, the most specific applicable instance wins — Kong's order:

    consumer+route+service > consumer+route > consumer+service > route+service > consumer > route
    > service > global

A winning instance with `enabled: false` switches that plugin off for its scope (e.g. a route exempt
from a global key-auth).

Order. Hooks run phase by phase (rewrite, access, response, log); within a phase, plugins named in the
route's `plugin_order` run first in that order, the others follow by `priority` (higher first, then
name). The order key of a hook is the same in every pipeline of a route, so a request that switches to
its consumer's pipeline after authentication resumes exactly after the hook that identified it.

Sharing. Plugin objects are built once per instance, and routes with the same plugins and order share
one Pipeline, so 1,000 routes under a global key-auth hold one pipeline, not 1,000.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tollway.plugins.base import Plugin, PluginContext
from tollway.plugins.builtin.https_policy import uses_route_policies, with_route_policies
from tollway.plugins.consumers import Consumer, Consumers
from tollway.plugins.registry import canonical_name, resolve
from tollway.proxy.pipeline import ConsumerPipelines, Hook, OrderKey, Pipeline

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig, PluginInstance, Route
    from tollway.proxy.snapshot import CompiledRoute

_PHASE_INDEX = {"rewrite": 0, "access": 1, "response": 2, "log": 3}


@dataclass(frozen=True, eq=False)
class Configured:
    """One configured plugin instance, built."""

    name: str  # the plugin's canonical name
    plugin: Plugin[Any] | None  # None when the instance is disabled
    route: str | None
    service: str | None
    consumer: str | None

    @property
    def rank(self) -> int:
        """Specificity (Kong's precedence): higher wins."""
        c, r, s = self.consumer is not None, self.route is not None, self.service is not None
        return [0, 1, 2, 4, 3, 5, 6, 7][(c << 2) | (r << 1) | s]

    def applies(self, route: str, service: str, consumer: str | None) -> bool:
        return (
            (self.route is None or self.route == route)
            and (self.service is None or self.service == service)
            and (self.consumer is None or self.consumer == consumer)
        )


class PluginSet:
    """All plugin instances of one config version, and the pipelines built from them."""

    def __init__(self, config: GatewayConfig) -> None:
        self.consumers = Consumers(config)
        self.context = PluginContext(self.consumers, config)
        self.instances = [self._build(*item) for item in _instances(config)]
        self.consumer_scoped = [i for i in self.instances if i.consumer is not None]
        for instance in self.consumer_scoped:
            consumer = self.consumers.by_username.get(instance.consumer or "")
            if consumer is not None:
                consumer.has_plugins = True
        self._pipelines: dict[tuple[Any, ...], Pipeline] = {}

    def __repr__(self) -> str:
        return f"<PluginSet instances={len(self.instances)} pipelines={len(self._pipelines)}>"

    def _build(
        self, instance: PluginInstance, route: str | None, service: str | None, consumer: str | None
    ) -> Configured:
        cls = resolve(instance.name)
        plugin = None
        if instance.enabled:
            where = [
                f"{k}={v}" for k, v in (("route", route), ("service", service), ("consumer", consumer)) if v
            ]
            context = self.context.for_instance(",".join(where) or "global")
            plugin = cls(cls.config_model.model_validate(instance.config), context)
        return Configured(cls.name, plugin, route, service, consumer)

    def pipeline_for(self, route: Route, consumer: Consumer | None = None) -> Pipeline | None:
        """The pipeline of `route` (for `consumer`, once known); None when no plugin applies."""
        username = consumer.username if consumer is not None else None
        chosen: dict[str, Configured] = {}
        for instance in self.instances:
            if instance.applies(route.name, route.service, username):
                best = chosen.get(instance.name)
                if best is None or instance.rank > best.rank:
                    chosen[instance.name] = instance
        active = [i for i in chosen.values() if i.plugin is not None]
        if not active:
            return None
        order = [canonical_name(ref) for ref in route.plugin_order or ()]
        return self._pipeline(active, order)

    def _pipeline(self, active: Sequence[Configured], order: list[str]) -> Pipeline:
        memo_key = (tuple(id(i) for i in active), tuple(order))
        pipeline = self._pipelines.get(memo_key)
        if pipeline is None:
            pipeline = self._pipelines[memo_key] = _assemble(active, order)
        return pipeline

    def attach(self, config: GatewayConfig, routes: Sequence[CompiledRoute]) -> None:
        for spec, compiled in zip(config.routes, routes, strict=True):
            pipeline = self.pipeline_for(spec)
            if self._consumer_plugins_may_apply(spec):
                pipeline = self._with_consumer_switch(spec, pipeline)
            compiled.pipeline = pipeline

    def _consumer_plugins_may_apply(self, route: Route) -> bool:
        return any(i.applies(route.name, route.service, i.consumer) for i in self.consumer_scoped)

    def _with_consumer_switch(self, route: Route, pipeline: Pipeline | None) -> Pipeline | None:
        if pipeline is None:
            return None  # no authentication plugin on the route: no consumer will ever be known
        # A private copy: the switch is per route, and pipelines are shared between routes.
        own = Pipeline(
            pipeline.rewrite,
            pipeline.access,
            pipeline.response,
            pipeline.log,
            pipeline.name,
            pipeline.names,
            pipeline.keys,
            pipeline.response_names,
            pipeline.log_names,
        )

        def build(consumer: Any) -> Pipeline | None:
            if not isinstance(consumer, Consumer) or not consumer.has_plugins:
                return None
            other = self.pipeline_for(route, consumer)
            return None if other is pipeline else other

        own.consumers = ConsumerPipelines(build)
        return own


def _assemble(active: Sequence[Configured], order: list[str]) -> Pipeline:
    request: list[tuple[OrderKey, Hook, str, int]] = []
    response: list[tuple[OrderKey, Hook, str]] = []
    log: list[tuple[OrderKey, Hook, str]] = []
    for instance in active:
        plugin = instance.plugin
        assert plugin is not None
        for phase in plugin.phases:
            key = _order_key(phase, instance.name, plugin.priority, order)
            hook = plugin.hook(phase)
            if phase in ("rewrite", "access"):
                request.append((key, hook, instance.name, _PHASE_INDEX[phase]))
            elif phase == "response":
                response.append((key, hook, instance.name))
            else:
                log.append((key, hook, instance.name))
    request.sort(key=lambda item: item[0])
    response.sort(key=lambda item: item[0])
    log.sort(key=lambda item: item[0])
    return Pipeline(
        rewrite=tuple(h for _, h, _, phase in request if phase == 0),
        access=tuple(h for _, h, _, phase in request if phase == 1),
        response=tuple(h for _, h, _ in response),
        log=tuple(h for _, h, _ in log),
        name="+".join(name for _, _, name, _ in request) or "+".join(i.name for i in active),
        names=tuple(name for _, _, name, _ in request),
        keys=tuple(key for key, _, _, _ in request),
        response_names=tuple(name for _, _, name in response),
        log_names=tuple(name for _, _, name in log),
    )


def _order_key(phase: str, name: str, priority: int, order: list[str]) -> OrderKey:
    if name in order:
        return (_PHASE_INDEX[phase], 0, order.index(name), name)
    return (_PHASE_INDEX[phase], 1, -priority, name)


def _instances(config: GatewayConfig) -> list[tuple[PluginInstance, str | None, str | None, str | None]]:
    """Every plugin instance with the (route, service, consumer) it applies to."""
    found: list[tuple[PluginInstance, str | None, str | None, str | None]] = [
        (p, p.route, p.service, p.consumer) for p in config.plugins
    ]
    found += [(p, None, s.name, None) for s in config.services for p in s.plugins]
    found += [(p, r.name, None, None) for r in config.routes for p in r.plugins]
    found += [(p, None, None, c.username) for c in config.consumers for p in c.plugins]
    return found


def attach_pipelines(config: GatewayConfig, routes: Sequence[CompiledRoute]) -> PluginSet:
    """Build every plugin of `config` and give each compiled route its pipeline."""
    if uses_route_policies(config):  # routes' https_redirect / hsts options (docs/tls.md)
        config = with_route_policies(config)
    plugins = PluginSet(config)
    plugins.attach(config, routes)
    return plugins
