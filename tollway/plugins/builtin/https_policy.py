"""https-policy: send clear-text clients to https, and tell browsers to stay there (HSTS).

Routes usually get it through their own options (`https_redirect`, `hsts`: docs/tls.md), which add this
plugin to the route when the config is compiled; it can also be configured like any plugin (globally,
per service). It runs first of all (edge band): a clear-text request is redirected before anything could
answer it with a 401 that would send a credential in clear text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tollway.plugins.base import HeaderValue, Plugin, PluginConfig, PluginContext
from tollway.proxy.pdk import Response

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.proxy.pdk import RequestContext

_SAFE_METHODS = frozenset((b"GET", b"HEAD"))


class HttpsPolicyConfig(PluginConfig):
    redirect: bool = Field(False, description="answer clear-text requests with a redirect to https")
    https_port: int | None = Field(
        None, ge=1, le=65535, description="port in the redirect (null: the client's Host without its port)"
    )
    hsts: HeaderValue | None = Field(
        None, description='Strict-Transport-Security on answers over https, e.g. "max-age=31536000"'
    )


class HttpsPolicy(Plugin[HttpsPolicyConfig]):
    name = "https-policy"
    priority = 3950

    def __init__(self, config: HttpsPolicyConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._redirect = config.redirect
        self._port = b"" if config.https_port in (None, 443) else b":%d" % config.https_port
        self._hsts = config.hsts

    def access(self, ex: RequestContext) -> Response | None:
        if ex.client.scheme == b"https":
            if self._hsts is not None:
                ex.set_response_header("Strict-Transport-Security", self._hsts)
            return None
        if not self._redirect:
            return None
        host = _without_port(ex.host)
        if not host:
            return None  # nothing to redirect to: let the route answer
        target = ex.url
        if not target.startswith(b"/"):  # absolute form (http://host/path): keep the path and query
            rest = target.partition(b"://")[2]
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
        status = 301 if ex.method in _SAFE_METHODS else 308  # 308 keeps the method and body
        location = b"https://" + host + self._port + target
        return Response(status, b"", [(b"Location", location), (b"Content-Type", b"text/plain")])


def _without_port(host: bytes) -> bytes:
    if host.startswith(b"["):  # [v6]:port
        return host[: host.find(b"]") + 1]
    return host.partition(b":")[0]


def with_route_policies(config: GatewayConfig) -> GatewayConfig:
    """The config with each route's `https_redirect` / `hsts` turned into an https-policy plugin of the
    route (at compile time; the file keeps the short form)."""
    from tollway.config.schema import PluginInstance

    routes = []
    for route in config.routes:
        if not route.https_redirect and route.hsts is None:
            routes.append(route)
            continue
        redirect = route.https_redirect
        port = None if isinstance(redirect, bool) else redirect
        policy = {"redirect": bool(redirect), "https_port": port, "hsts": route.hsts}
        instance = PluginInstance(name="https-policy", config=policy)
        routes.append(route.model_copy(update={"plugins": [*route.plugins, instance]}))
    return config.model_copy(update={"routes": routes})


def uses_route_policies(config: GatewayConfig) -> bool:
    return any(route.https_redirect or route.hsts is not None for route in config.routes)
