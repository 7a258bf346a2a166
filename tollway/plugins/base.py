"""The public plugin API: subclass `Plugin`, give it a `PluginConfig`, override the hooks you need.

    class Config(PluginConfig):
        header: HeaderName = "X-Hello"
        value: HeaderValue = "world"

    class Hello(Plugin[Config]):
        name = "hello"            # kebab-case, the name configs use
        priority = 800            # a band below (transformations)

        def access(self, ex: RequestContext) -> None:
            ex.set_header(self.config.header, self.config.value)

A plugin instance is built once per configured instance and config version, with its validated config
(`self.config`); hooks then run per request with the request context (`tollway.proxy.pdk.RequestContext`,
the plugin development kit: docs/plugins/writing-plugins.md). Hooks:

- `rewrite(ex)`, `access(ex)`: return None to go on, a `Response` to answer now, or an awaitable (a
  coroutine) resolving to either when the hook must wait for I/O. Only an awaitable costs a task.
- `response(ex)`: the backend's response head is in `ex.response_head` (edit `.headers`); synchronous.
- `log(ex)`: after the response is sent; synchronous (queue slow work, never block).

A hook that raises answers its request 500 with a request id and logs the traceback under the plugin's
name; raise a `tollway.errors.TollwayError` subclass to answer its status instead. The phases a plugin
runs in are the hooks it overrides. docs/plugins/writing-plugins.md documents all of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict

from tollway.proxy.pdk import Response

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.plugins.consumers import Consumers
    from tollway.proxy.pdk import RequestContext

PHASES = ("rewrite", "access", "response", "log")

# Priority bands: higher runs first within a phase. A route's `plugin_order` overrides them.
BAND_EDGE = (3000, 3999)  # request ids, CORS preflights: before anything can refuse a request
BAND_AUTHENTICATION = (2000, 2999)  # who is calling: key-auth, basic-auth, jwt
BAND_AUTHORIZATION = (1500, 1999)  # may they: acl, ip-restriction
BAND_LIMITS = (1000, 1499)  # how much: rate limits, request size
BAND_TRANSFORMATION = (500, 999)  # what the backend and the client see: transformers
BAND_LOGGING = (0, 499)  # recording: loggers, metrics
BANDS: dict[str, tuple[int, int]] = {
    "edge": BAND_EDGE,
    "authentication": BAND_AUTHENTICATION,
    "authorization": BAND_AUTHORIZATION,
    "limits": BAND_LIMITS,
    "transformation": BAND_TRANSFORMATION,
    "logging": BAND_LOGGING,
}

HookResult = Response | None | Awaitable[Response | None]
Loc = tuple[str | int, ...]


class PluginConfig(BaseModel):
    """Base of plugin config and credential schemas: immutable, and unknown keys are errors (a typo
    must never be silently ignored). Validated when the configuration is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- field types for header names and values: what reaches a header must not inject one --------------------
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    return name


def check_header_value(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("header values must not contain CR, LF, NUL or other control characters")
    return value


HeaderName = Annotated[str, AfterValidator(check_header_name)]
HeaderValue = Annotated[str, AfterValidator(check_header_value)]


class PluginContext:
    """What a plugin's constructor gets besides its config: the consumers and their credentials, the
    whole configuration, a logger, and `shared()` to build something once per config version for every
    instance of a plugin (a credential index must not be built once per route)."""

    def __init__(self, consumers: Consumers, config: GatewayConfig, attachment: str = "global") -> None:
        self.consumers = consumers
        self.config = config
        # Where the instance being built is attached: "global", or "route=a", "service=s,consumer=c"...
        # Stable across reloads, so state keyed by it (a rate limit's counters) survives them.
        self.attachment = attachment
        self.log = logging.getLogger("tollway.plugins")
        self._shared: dict[Any, Any] = {}

    def for_instance(self, attachment: str) -> PluginContext:
        """The same context for one instance attached at `attachment` (shares `shared()`)."""
        other = PluginContext(self.consumers, self.config, attachment)
        other._shared = self._shared
        return other

    def shared(self, key: Any, factory: Callable[[], Any]) -> Any:
        if key not in self._shared:
            self._shared[key] = factory()
        return self._shared[key]


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(Generic[ConfigT]):
    """Base class of every plugin. Class attributes:

    - `name`: kebab-case, as configs name the plugin (required)
    - `priority`: order within a phase, higher first; pick it in a band (see BANDS)
    - `consumer_credential`: for authentication plugins, the schema of a credential in
      `consumers[].credentials.<name>`; validated at load like the config
    - `consumer_scoped`: False when the plugin cannot be configured per consumer (authentication)
    - `config_model` and `phases` are inferred: from `Plugin[Config]` and from the overridden hooks
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    config_model: ClassVar[type[PluginConfig]] = PluginConfig
    consumer_credential: ClassVar[type[PluginConfig] | None] = None
    consumer_scoped: ClassVar[bool] = True
    phases: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        model = _config_argument(cls)
        if model is not None:
            cls.config_model = model
        cls.phases = frozenset(p for p in PHASES if getattr(cls, p) is not getattr(Plugin, p))

    def __init__(self, config: ConfigT, context: PluginContext) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"

    # -- hooks: override the ones the plugin needs ------------------------------------------------------
    def rewrite(self, ex: RequestContext) -> HookResult:
        return None

    def access(self, ex: RequestContext) -> HookResult:
        return None

    def response(self, ex: RequestContext) -> None:
        return None

    def log(self, ex: RequestContext) -> None:
        return None

    def hook(self, phase: str) -> Callable[[RequestContext], Any]:
        """The callable the pipeline runs for `phase` (one of `phases`): the method of that name. A
        plugin may hand a faster callable with the same behaviour instead (proxy-cache: a compiled
        hit path in front of its `access`)."""
        hook: Callable[[RequestContext], Any] = getattr(self, phase)
        return hook

    # -- load-time checks beyond the config schema --------------------------------------------------------
    @classmethod
    def check(cls, config: ConfigT, gateway: GatewayConfig) -> Iterable[tuple[Loc, str]]:
        """Problems only the whole configuration shows (a consumer that does not exist, ...): yield
        (location inside this plugin's config, message). Runs when the configuration is loaded."""
        return ()


def _config_argument(cls: type) -> type[PluginConfig] | None:
    """The X of `class P(Plugin[X])` (or of any generic base between P and Plugin)."""
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Plugin):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, PluginConfig):
                    return arg
    return None
