"""key-auth: an API key in a request header (or query parameter) identifies the consumer.

Keys live in the consumers' credentials, either as given to the client (`key`) or as their SHA-256
(`key_sha256`), so a config file need not hold usable keys. Both are indexed once per config version:
a request costs one dict lookup (plus one SHA-256, ~1 µs, only when hashed keys exist and the plain
lookup missed), however many consumers there are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from tollway.plugins.auth import AuthConfig, AuthPlugin, take_query_param
from tollway.plugins.base import HeaderName, PluginConfig, PluginContext
from tollway.plugins.consumers import Consumer, identify

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext, Response

Index = dict[bytes, tuple[Consumer, Any]]


class KeyAuthConfig(AuthConfig):
    key_names: list[HeaderName] = Field(
        default_factory=lambda: ["apikey"],
        min_length=1,
        description="header (and query parameter) names that carry the key, tried in order",
    )
    key_in_header: bool = Field(True, description="look for the key in request headers")
    key_in_query: bool = Field(
        False,
        description="look for the key in the query string (keys in URLs end up in logs: off by default)",
    )

    @model_validator(mode="after")
    def _somewhere(self) -> KeyAuthConfig:
        if not (self.key_in_header or self.key_in_query):
            raise ValueError("at least one of key_in_header or key_in_query must be true")
        return self


class KeyCredential(PluginConfig):
    key: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=r"^[\x21-\x7e]+$",
        description="the API key (printable ASCII, no spaces)",
    )
    key_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="or the SHA-256 of the key, lowercase hex"
    )

    @model_validator(mode="after")
    def _one(self) -> KeyCredential:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("exactly one of `key` or `key_sha256` is required")
        return self

    def identity(self) -> Hashable:
        return self.key_sha256 or hashlib.sha256((self.key or "").encode()).hexdigest()


class KeyAuth(AuthPlugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 2500
    consumer_credential = KeyCredential
    scheme = "Key"

    def __init__(self, config: KeyAuthConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._plain, self._hashed = context.shared(("key-auth", "index"), lambda: _index(context))
        self._lnames = tuple(name.lower().encode("latin-1") for name in config.key_names)
        self._query_names = frozenset(config.key_names) if config.key_in_query else frozenset()
        self._in_header = config.key_in_header
        self._hide = config.hide_credentials

    def access(self, ex: RequestContext) -> Response | None:
        if self.anonymous is not None and ex.credential is not None:
            return None  # an earlier authentication plugin of an OR succeeded
        key = None
        if self._in_header:
            for lname in self._lnames:
                key = ex.pop_header(lname) if self._hide else ex.header_bytes(lname)
                if key is not None:
                    break
        if key is None and self._query_names and ex.query:
            value = take_query_param(ex, self._query_names, self._hide)
            key = value.encode("utf-8") if value is not None else None
        if key is None:
            return self.reject(ex, "missing")
        found = self._plain.get(key)
        if found is None and self._hashed:
            found = self._hashed.get(hashlib.sha256(key).digest())
        if found is None:
            return self.reject(ex)
        identify(ex, found[0], found[1])
        return None


def _index(context: PluginContext) -> tuple[Index, Index]:
    plain: Index = {}
    hashed: Index = {}
    for consumer, credential in context.consumers.credentials("key-auth", KeyCredential):
        if credential.key is not None:
            plain[credential.key.encode("ascii")] = (consumer, credential)
        else:
            hashed[bytes.fromhex(credential.key_sha256)] = (consumer, credential)
    return plain, hashed
