"""Consumers as the hot path sees them, and how an authentication plugin marks a request as theirs.

A `Consumer` is built once per config version with the header fields it sends to backends already
encoded. `identify` is what every authentication plugin calls on success: it drops identity headers the
client sent itself (X-Consumer-Id and friends must only ever come from the gateway), appends the
consumer's, and records the consumer and credential on the exchange.

`Consumers` is the build-time registry: consumers by username, and each authentication plugin's
credentials validated against its schema, once per config version, for plugins to index.

Compiled with mypyc (see setup.py): `identify` runs on every authenticated request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pydantic import BaseModel

    from tollway.config.schema import Consumer as ConsumerSpec
    from tollway.config.schema import GatewayConfig
    from tollway.proxy.pdk import RequestContext

# Request headers only the gateway may set: stripped from the client's request on authentication.
IDENTITY_HEADERS: Final = frozenset(
    {
        b"x-consumer-id",
        b"x-consumer-username",
        b"x-consumer-groups",
        b"x-credential-identifier",
        b"x-anonymous-consumer",
    }
)


_NO_GROUPS: Final = frozenset[str]()  # shared: most consumers are in no group


class Consumer:
    __slots__ = ("_anonymous_headers", "_headers", "groups", "groups_value", "has_plugins", "id", "username")

    def __init__(self, username: str, consumer_id: str, groups: frozenset[str]) -> None:
        self.username = username
        self.id = consumer_id
        self.groups = groups
        self.groups_value = ", ".join(sorted(groups)).encode("utf-8")
        self.has_plugins = False  # plugins configured for this consumer (set by plugins.build)
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._anonymous_headers: list[tuple[bytes, bytes]] | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """X-Consumer-Id and X-Consumer-Username: built on the consumer's first request, since a worker
        holding 10,000 consumers would otherwise hold 10,000 of them (~2.5 MB) before any request."""
        headers = self._headers
        if headers is None:
            name = self.username.encode("utf-8")
            consumer_id = self.id
            headers = self._headers = [
                (b"X-Consumer-Id", name if consumer_id == self.username else consumer_id.encode("utf-8")),
                (b"X-Consumer-Username", name),
            ]
        return headers

    @property
    def anonymous_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers of the anonymous fallback: built on first use, since only the one consumer a
        plugin names as `anonymous` needs them (10,000 consumers would hold 1.2 MB of them)."""
        headers = self._anonymous_headers
        if headers is None:
            headers = self._anonymous_headers = [*self.headers, (b"X-Anonymous-Consumer", b"true")]
        return headers

    def __repr__(self) -> str:
        return f"<Consumer {self.username}>"


def identify(ex: RequestContext, consumer: Consumer, credential: Any, anonymous: bool = False) -> None:
    """The request belongs to `consumer` (authenticated by `credential`, or the anonymous fallback)."""
    headers = ex.headers
    for name, _ in headers:
        if name.lower() in IDENTITY_HEADERS:
            headers = ex.headers = [h for h in headers if h[0].lower() not in IDENTITY_HEADERS]
            break
    headers.extend(consumer.anonymous_headers if anonymous else consumer.headers)
    ex.consumer = consumer
    ex.credential = None if anonymous else credential


class Consumers:
    """Build-time registry of one config version's consumers."""

    def __init__(self, config: GatewayConfig) -> None:
        self.specs: dict[str, ConsumerSpec] = {c.username: c for c in config.consumers}
        self.by_username: dict[str, Consumer] = {
            c.username: Consumer(
                c.username, c.id or c.username, frozenset(c.groups) if c.groups else _NO_GROUPS
            )
            for c in config.consumers
        }
        self._credentials: dict[str, list[tuple[Consumer, Any]]] = {}

    def __repr__(self) -> str:
        return f"<Consumers {len(self.by_username)}>"

    def credentials(self, plugin: str, model: type[BaseModel]) -> list[tuple[Consumer, Any]]:
        """Every consumer's credentials for `plugin`, validated with `model` (once per config version)."""
        found = self._credentials.get(plugin)
        if found is None:
            found = []
            from tollway.config.compact import Compactor
            from tollway.plugins.registry import canonical_name

            # 10,000 credentials: ~2 MB less, and compacted one by one, the field set each validation
            # makes is freed before the next one is made (the worker's peak is its RSS)
            compactor = Compactor()

            names: dict[str, str] = {}  # reference -> plugin name, resolved once per distinct reference
            for username, spec in self.specs.items():
                consumer = self.by_username[username]
                for reference, items in spec.credentials.items():
                    name = names.get(reference)
                    if name is None:
                        name = names[reference] = canonical_name(reference)
                    if reference == plugin or name == plugin:
                        for raw in items:
                            credential = model.model_validate(raw)
                            compactor.model(credential)
                            found.append((consumer, credential))
            self._credentials[plugin] = found
        return found
