"""The admin API's routing and access control: which handler a path and method go to, who may call it.

Paths (docs/admin-api.md):
  /{kind}                                  GET list, POST create     (kind: upstreams services routes
  /{kind}/{id or name}                     GET PUT PATCH DELETE       consumers plugins)
  /services/{name}/routes[/{route}]        routes of a service
  /{services|routes|consumers}/{name}/plugins[/{plugin}]   plugins scoped to it
  /upstreams/{name}/targets[/{host:port}]  /consumers/{name}/credentials[/{plugin}[/{index}]]
  /config (GET export, POST apply, ?dry_run ?prune)  /audit  /cluster  /openapi.json  /docs
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from tollway import __version__
from tollway.admin import bulk, children, entities
from tollway.admin.common import Call, find, load
from tollway.admin.entities import Scope
from tollway.admin.errors import ApiError
from tollway.admin.http import Request, Response
from tollway.admin.openapi import docs_page, openapi_document
from tollway.admin.tokens import identify
from tollway.errors import TollwayError
from tollway.store.base import ConfigStore
from tollway.store.model import KINDS

READ = ("GET", "HEAD")
_ENTITY_METHODS = ("GET", "HEAD", "PUT", "PATCH", "DELETE")
# parent kind → the kinds nested under it, with the field of the child that names the parent
NESTED = {
    "services": {"routes": "service", "plugins": "service"},
    "routes": {"plugins": "route"},
    "consumers": {"plugins": "consumer"},
    "upstreams": {"services": "upstream"},
}


class AdminApp:
    def __init__(self, store: ConfigStore, auth: str) -> None:
        self.store = store
        self.auth = auth  # "none" | "token"
        self.auth_failures: Counter[str] = Counter()  # reason → count (metric)
        self.requests: Counter[tuple[str, int]] = Counter()  # (method, status) → count (metric)
        # The node's upstream health (the status listener's /upstreams), set by the server at start.
        self.upstream_health: Callable[[], Awaitable[dict[str, Any]]] | None = None

    async def __call__(self, request: Request) -> Response:
        try:
            response = await self._handle(request)
        except ApiError as exc:
            response = exc.response()
        self.requests[(request.method if request.method in _KNOWN else "other", response.status)] += 1
        return response

    async def _handle(self, request: Request) -> Response:
        _refuse_browsers(request, self.auth)
        actor = await self._authorize(request)
        return await self._route(Call(request, self.store, actor))

    async def _authorize(self, request: Request) -> str:
        if self.auth == "none":
            return f"anonymous@{request.client}"
        try:
            token = await identify(self.store, request.headers.get("authorization"))
        except TollwayError as exc:
            raise ApiError(503, f"{exc.message}: {exc}") from None
        if token is None:
            reason = "missing" if "authorization" not in request.headers else "invalid"
            self.auth_failures[reason] += 1
            raise ApiError(401, "a valid admin token is required (Authorization: Bearer …)")
        if token.role != "admin" and request.method not in READ:
            self.auth_failures["forbidden"] += 1
            raise ApiError(403, f"token {token.name!r} is read-only: it may only GET")
        return token.name

    async def _route(self, call: Call) -> Response:
        path, method = call.request.path, call.request.method
        if not path:
            return _only(method, READ, lambda: _index())
        head, rest = path[0], path[1:]
        if head == "health" and not rest:
            return await _only_async(method, READ, lambda: self._health())
        if head in _FIXED and not rest:
            allowed, handler = _FIXED[head]
            return await _only_async(method, allowed, lambda: handler(call))
        if head not in KINDS or len(path) > 5:
            raise ApiError(404, f"no such resource: /{'/'.join(path)}")
        if len(path) == 1:
            return await _collection(call, head, None)
        if len(path) == 2:
            return await _entity(call, head, path[1], None)
        return await self._nested(call, head, path[1], path[2], path[3:])

    async def _nested(self, call: Call, parent: str, name: str, child: str, rest: list[str]) -> Response:
        method = call.request.method
        if parent == "upstreams" and child == "targets" and len(rest) <= 1:
            verbs = ("GET", "HEAD", "POST") if not rest else _ENTITY_METHODS
            return await _only_async(
                method, verbs, lambda: children.targets(call, name, rest[0] if rest else None)
            )
        if parent == "consumers" and child == "credentials" and len(rest) <= 2:
            allowed: tuple[str, ...] = READ
            if rest:
                allowed = ("GET", "HEAD", "POST") if len(rest) == 1 else _ENTITY_METHODS
            plugin = rest[0] if rest else None
            index = rest[1] if len(rest) > 1 else None
            return await _only_async(method, allowed, lambda: children.credentials(call, name, plugin, index))
        field = NESTED.get(parent, {}).get(child)
        if field is None or len(rest) > 1:
            raise ApiError(404, f"no such resource: /{'/'.join(call.request.path)}")
        rows = await load(call)
        owner = find(rows, parent, name)
        if owner is None:
            raise ApiError(404, f"no {parent[:-1]} {name!r}")
        scope = Scope(field, owner.key)
        if not rest:
            return await _collection(call, child, scope)
        return await _entity(call, child, rest[0], scope)

    async def _health(self) -> Response:
        if self.upstream_health is None:
            raise ApiError(404, "upstream health is served by the node that runs this listener only")
        return Response(200, await self.upstream_health())


_BODY_TYPES = ("application/json", "application/merge-patch+json", "application/yaml", "application/x-yaml")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _refuse_browsers(request: Request, auth: str) -> None:
    """A web page must not drive the API through a browser on the operator's machine.

    - A body must be declared JSON or YAML: a page can POST text/plain or a form anywhere without a CORS
      preflight, but not application/json (and the API answers no preflight), so no cross-site write.
    - Without tokens, the Host must be a loopback name: a page whose own name resolves to 127.0.0.1
      (DNS rebinding) sends its own name as Host.
    """
    if request.body and request.method not in READ:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype not in _BODY_TYPES:
            raise ApiError(415, "a body must be sent as Content-Type: application/json (or application/yaml)")
    if auth == "none":
        host = request.headers.get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name and name not in _LOCAL_HOSTS and not name.startswith("127."):
            raise ApiError(403, f"Host {host!r} is not a loopback name (auth: none answers loopback only)")


_KNOWN = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def _collection(call: Call, kind: str, scope: Scope | None) -> Response:
    method = call.request.method
    if method in READ:
        return await entities.list_entities(call, kind, scope)
    if method == "POST":
        return await entities.create(call, kind, scope)
    raise _not_allowed(("GET", "HEAD", "POST"))


async def _entity(call: Call, kind: str, ident: str, scope: Scope | None) -> Response:
    method = call.request.method
    handler = {
        "GET": entities.get_entity,
        "HEAD": entities.get_entity,
        "PUT": entities.replace,
        "PATCH": entities.patch,
        "DELETE": entities.delete,
    }.get(method)
    if handler is None:
        raise _not_allowed(_ENTITY_METHODS)
    return await handler(call, kind, ident, scope)


def _not_allowed(allowed: tuple[str, ...]) -> ApiError:
    error = ApiError(405, f"method not allowed here (allowed: {', '.join(allowed)})")
    error.extra["allowed"] = list(allowed)
    error.headers["Allow"] = ", ".join(allowed)
    return error


def _only(method: str, allowed: tuple[str, ...], handler: Callable[[], Response]) -> Response:
    if method not in allowed:
        raise _not_allowed(allowed)
    return handler()


async def _only_async(
    method: str, allowed: tuple[str, ...], handler: Callable[[], Awaitable[Response]]
) -> Response:
    if method not in allowed:
        raise _not_allowed(allowed)
    return await handler()


def _index() -> Response:
    return Response(
        200,
        {
            "tollway": __version__,
            "resources": [f"/{kind}" for kind in KINDS] + ["/config", "/audit", "/cluster", "/health"],
            "openapi": "/openapi.json",
            "docs": "/docs",
        },
    )


async def _openapi(call: Call) -> Response:
    return Response(200, openapi_document())


async def _docs(call: Call) -> Response:
    return Response(200, docs_page(), content_type="text/html; charset=utf-8")


async def _config(call: Call) -> Response:
    return await (bulk.export(call) if call.request.method in READ else bulk.apply(call))


_FIXED: dict[str, tuple[tuple[str, ...], Callable[[Call], Awaitable[Response]]]] = {
    "openapi.json": (READ, _openapi),
    "docs": (READ, _docs),
    "config": (("GET", "HEAD", "POST"), _config),
    "audit": (READ, bulk.audit),
    "cluster": (READ, bulk.cluster),
}


def metrics(app: AdminApp) -> list[Any]:
    """Prometheus families: failed authentications by reason, requests by method and status."""
    from prometheus_client.core import CounterMetricFamily

    failures = CounterMetricFamily(
        "tollway_admin_auth_failures",
        "Admin API requests refused: missing/invalid token, or read-only",
        labels=["reason"],
    )
    for reason in ("missing", "invalid", "forbidden"):
        failures.add_metric([reason], app.auth_failures[reason])
    requests = CounterMetricFamily(
        "tollway_admin_requests", "Admin API requests answered", labels=["method", "status"]
    )
    for (method, status), count in sorted(app.requests.items()):
        requests.add_metric([method, str(status)], count)
    return [failures, requests]
