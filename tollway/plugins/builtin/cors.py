"""cors: Cross-Origin Resource Sharing, answered at the gateway.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here with 204 and the
  Access-Control-Allow-* headers, or 403 when the origin or method is not allowed; the backend never
  sees it (unless `preflight_continue`).
- An actual cross-origin request from an allowed origin goes on; its response (the backend's or the
  gateway's own, a 401 included, so a browser can read it) gets Access-Control-Allow-Origin, -Credentials
  and -Expose-Headers, replacing any the backend set. Other origins get no CORS headers — those the
  backend sent (its own `Access-Control-Allow-Origin: *`) are removed — so the browser withholds the
  response from the page.
- Requests without Origin pass untouched.

Origins are exact (`https://app.example.com`), `*`, or a regular expression after `~`
(`~^https://[a-z]+\\.example\\.com$`). With `credentials: true` a `*` reflects the request's origin
(browsers refuse `*` with credentials). Put cors on the routes that serve browsers, and let their
`methods` include OPTIONS (or list none), or the router answers the preflight 405 first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from tollway.config.types import Duration
from tollway.plugins.base import HeaderName, Plugin, PluginConfig, PluginContext
from tollway.proxy.pdk import Response, error_response

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

# What a response grants cross-origin: removed from the backend's response when the origin is refused.
_GRANTS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers")
_DEFAULT_METHODS = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"]
_ORIGIN = re.compile(r"^(\*|null|https?://[^\s/?#]+)$")
_TOKEN_LIST = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*$")


class CorsConfig(PluginConfig):
    origins: list[str] = Field(min_length=1, description='allowed origins: exact, "*", or "~regex"')
    methods: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_METHODS),
        description="methods allowed cross-origin (preflight answer)",
    )
    headers: list[HeaderName] | None = Field(
        None, description="request headers allowed; null: whatever the preflight asks for"
    )
    exposed_headers: list[HeaderName] = Field(
        default_factory=list, description="response headers the page may read"
    )
    credentials: bool = Field(False, description="allow cookies and Authorization (Allow-Credentials)")
    max_age: Duration | None = Field(None, description="how long browsers may cache a preflight answer")
    preflight_continue: bool = Field(False, description="forward preflights to the backend instead")

    @field_validator("origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin.startswith("~"):
                try:
                    re.compile(origin[1:])
                except re.error as exc:
                    raise ValueError(f"{origin!r}: invalid regular expression: {exc}") from exc
            elif not _ORIGIN.match(origin):
                raise ValueError(f'{origin!r} is not an origin ("https://host[:port]", "*" or "~regex")')
        return origins

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[str]) -> list[str]:
        methods = [m.upper() for m in methods]
        for method in methods:
            if not re.fullmatch(r"[A-Z][A-Z0-9_-]{0,31}", method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return methods


class Cors(Plugin[CorsConfig]):
    name = "cors"
    priority = 3000

    def __init__(self, config: CorsConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._any = "*" in config.origins
        self._exact = frozenset(o for o in config.origins if not o.startswith("~"))
        self._patterns = [re.compile(o[1:]) for o in config.origins if o.startswith("~")]
        self._methods = frozenset(config.methods)
        self._methods_value = ", ".join(config.methods)
        self._headers = None if config.headers is None else frozenset(h.lower() for h in config.headers)
        self._headers_value = ", ".join(config.headers or ())
        self._expose = ", ".join(config.exposed_headers)
        self._credentials = config.credentials
        self._max_age = str(int(config.max_age)) if config.max_age is not None else None
        self._seen: dict[str, bool] = {}  # origin -> allowed (bounded)

    def access(self, ex: RequestContext) -> Response | None:
        origin_bytes = ex.header_bytes(b"origin")
        if origin_bytes is None:
            return None
        origin = origin_bytes.decode("latin-1")
        preflight = ex.method == b"OPTIONS" and ex.header_bytes(b"access-control-request-method") is not None
        allowed = self._allowed(origin)
        if preflight and not self.config.preflight_continue:
            return self._preflight(ex, origin, allowed)
        if allowed:
            self._decorate(ex, origin)
        else:  # a grant the backend made itself must not reach the browser either
            for name in _GRANTS:
                ex.remove_response_header(name)
        return None

    def _allowed(self, origin: str) -> bool:
        known = self._seen.get(origin)
        if known is None:
            known = self._any or origin in self._exact or any(p.fullmatch(origin) for p in self._patterns)
            if len(self._seen) >= 1024:
                self._seen.clear()
            self._seen[origin] = known
        return known

    def _allow_origin(self, origin: str) -> str:
        if self._any and not self._credentials:
            return "*"
        return origin  # exact match, pattern, or "*" with credentials: reflect (and Vary: Origin)

    def _decorate(self, ex: RequestContext, origin: str) -> None:
        value = self._allow_origin(origin)
        ex.set_response_header("Access-Control-Allow-Origin", value)
        if value != "*":
            ex.add_response_header("Vary", "Origin")
        if self._credentials:
            ex.set_response_header("Access-Control-Allow-Credentials", "true")
        if self._expose:
            ex.set_response_header("Access-Control-Expose-Headers", self._expose)

    def _preflight(self, ex: RequestContext, origin: str, allowed: bool) -> Response:
        rid = ex.request_id.decode("latin-1")
        method = (ex.header_bytes(b"access-control-request-method") or b"").decode("latin-1").strip()
        requested = (ex.header_bytes(b"access-control-request-headers") or b"").decode("latin-1").strip()
        if not allowed or method not in self._methods:
            return error_response(403, "CORS request not allowed", rid)
        if requested and not _TOKEN_LIST.match(requested):
            return error_response(403, "CORS request not allowed", rid)
        if self._headers is not None and requested:
            asked = {h.strip().lower() for h in requested.split(",")}
            if not asked <= self._headers:
                return error_response(403, "CORS request not allowed", rid)
        value = self._allow_origin(origin)
        headers = [
            ("Access-Control-Allow-Origin", value),
            ("Access-Control-Allow-Methods", self._methods_value),
        ]
        allow_headers = self._headers_value if self._headers is not None else requested
        if allow_headers:
            headers.append(("Access-Control-Allow-Headers", allow_headers))
        if self._credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        if self._max_age is not None:
            headers.append(("Access-Control-Max-Age", self._max_age))
        vary = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        headers += [("Vary", vary), ("X-Request-Id", rid)]
        return Response(204, b"", [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])
