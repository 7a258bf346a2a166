"""key-auth: an API key in a request header (or query parameter, or form / JSON body) identifies the
consumer.

Keys live in the consumers' credentials, either as given to the client (`key`) or as their SHA-256
(`key_sha256`), so a config file need not hold usable keys. Both are indexed once per config version:
a request costs one dict lookup (plus one SHA-256, ~1 µs, only when hashed keys exist and the plain
lookup missed), however many consumers there are.

A key name sent twice (two header fields, `?apikey=a&apikey=b`, even with equal values) is ambiguous and
refused like a wrong key. `key_in_body` reads the whole body (up to `max_body_size`) before the request
goes on; it costs nothing when off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

import orjson
from pydantic import Field, model_validator

from tollway.config.types import Size
from tollway.plugins.base import HeaderName, PluginConfig, PluginContext
from tollway.plugins.builtin.auth import AuthConfig, AuthPlugin, query_params
from tollway.plugins.builtin.key_lookup import HeaderKeyLookup, Index, header_key
from tollway.plugins.builtin.transform import is_form, is_json
from tollway.plugins.consumers import identify

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext, Response


class KeyAuthConfig(AuthConfig):
    key_names: list[HeaderName] = Field(
        default_factory=lambda: ["apikey"],
        min_length=1,
        description="names of the header (query parameter, body field) that carries the key, tried in "
        'order; in header names "_" and "-" are alike',
    )
    key_in_header: bool = Field(True, description="look for the key in request headers")
    key_in_query: bool = Field(
        False,
        description="look for the key in the query string (keys in URLs end up in logs: off by default)",
    )
    key_in_body: bool = Field(
        False,
        description="look for the key in a form (application/x-www-form-urlencoded) or JSON object body "
        "(the body is read before the request goes on)",
    )
    max_body_size: Size = Field(
        65536, ge=0, description="with key_in_body: largest body searched (larger or chunked: not searched)"
    )

    @model_validator(mode="after")
    def _somewhere(self) -> KeyAuthConfig:
        if not (self.key_in_header or self.key_in_query or self.key_in_body):
            raise ValueError("at least one of key_in_header, key_in_query or key_in_body must be true")
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


class _Ambiguous:
    """The key name was sent more than once (`?apikey=a&apikey=b`): which key would the client mean?"""


AMBIGUOUS = _Ambiguous()
Found = bytes | _Ambiguous | None


class KeyAuth(AuthPlugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 2500
    consumer_credential = KeyCredential
    scheme = "Key"

    def __init__(self, config: KeyAuthConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._plain, self._hashed = context.shared(("key-auth", "index"), lambda: _index(context))
        # header name (lowercase, "_" as "-") -> its place in key_names (the first name sent wins)
        self._header_rank: dict[bytes, int] = {}
        for rank, name in enumerate(config.key_names):
            self._header_rank.setdefault(header_key(name.encode("latin-1")), rank)
        self._names = tuple(config.key_names)
        self._name_set = frozenset(config.key_names)
        self._in_header = config.key_in_header
        self._in_query = config.key_in_query
        self._in_body = config.key_in_body
        self._max_body = config.max_body_size
        self._hide = config.hide_credentials

    def hook(self, phase: str) -> Callable[[RequestContext], Any]:
        if phase != "access" or not self._in_header:
            return super().hook(phase)
        # Keys in headers: the compiled lookup answers the common case, the rest comes back to access().
        lookup = HeaderKeyLookup(
            self._header_rank,
            len(self._names),
            self._hide,
            self._plain,
            self._hashed,
            self.anonymous is not None,
            self.access,
        )
        return lookup.access

    def access(self, ex: RequestContext) -> Response | Awaitable[Response | None] | None:
        if self.anonymous is not None and ex.credential is not None:
            return None  # an earlier authentication plugin of an OR succeeded
        key: Found = None
        if self._in_header:
            key = self._from_headers(ex)
        if key is None and self._in_query and ex.query:
            key = self._first_named(query_params(ex, self._name_set, self._hide))
        if key is None and self._in_body:
            body = ex.whole_request_body(self._max_body)
            if body is not None and not isinstance(body, bytes):
                return self._after_body(ex, body)
            key = self._from_body(ex, body)
        return self._decide(ex, key)

    async def _after_body(self, ex: RequestContext, pending: Awaitable[bytes | None]) -> Response | None:
        body = await pending
        if ex.done:
            return None  # the client left while its body was awaited: nothing to decide or count
        return self._decide(ex, self._from_body(ex, body))

    def _decide(self, ex: RequestContext, key: Found) -> Response | None:
        if key is None:
            return self.reject(ex, "missing")
        if isinstance(key, _Ambiguous):
            return self.reject(ex, "ambiguous")
        found = self._plain.get(key)
        if found is None and self._hashed:
            found = self._hashed.get(hashlib.sha256(key).digest())
        if found is None:
            return self.reject(ex)
        identify(ex, found[0], found[1])
        return None

    # -- where keys are -------------------------------------------------------------------------------
    def _from_headers(self, ex: RequestContext) -> Found:
        """The value of the first key name sent (key_names order); AMBIGUOUS if it was sent twice."""
        ranks = self._header_rank
        best = len(self._names)
        value: bytes | None = None
        twice = False
        for name, field in ex.headers:
            rank = ranks.get(header_key(name))
            if rank is None or rank > best:
                continue
            if rank == best:
                twice = True
            else:
                best, value, twice = rank, field, False
        if value is None:
            return None
        if self._hide:
            ex.headers = [h for h in ex.headers if ranks.get(header_key(h[0])) != best]
        return AMBIGUOUS if twice else value

    def _first_named(self, pairs: list[tuple[str, str]]) -> Found:
        """Of (name, value) pairs from a query string or form: the first key name's value."""
        if not pairs:
            return None
        for name in self._names:
            values = [value for key, value in pairs if key == name]
            if len(values) > 1:
                return AMBIGUOUS
            if values:
                return values[0].encode("utf-8")
        return None

    def _from_body(self, ex: RequestContext, body: bytes | None) -> Found:
        if not body or ex.header_bytes(b"content-encoding") is not None:
            return None  # (a compressed body is not unpacked to look for a key)
        content_type = ex.header_bytes(b"content-type")
        strip: Callable[[bytes], bytes | None]
        if is_form(content_type):
            pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True)
            key = self._first_named([(k, v) for k, v in pairs if k in self._name_set])
            strip = self._strip_form
        elif is_json(content_type):
            key = self._json_key(body)
            strip = self._strip_json
        else:
            return None
        if key is not None and self._hide:
            ex.buffer_request_body(strip, self._max_body)
        return key

    def _json_key(self, body: bytes) -> Found:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        for name in self._names:
            value = data.get(name)
            if isinstance(value, str):
                return value.encode("utf-8")
        return None

    def _strip_form(self, body: bytes) -> bytes:
        names = self._name_set
        return b"&".join(f for f in body.split(b"&") if _form_name(f) not in names)

    def _strip_json(self, body: bytes) -> bytes | None:
        try:
            data = orjson.loads(body)  # (what an earlier transform left: it may no longer be JSON)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        for name in self._names:
            data.pop(name, None)
        return orjson.dumps(data)


def _form_name(field: bytes) -> str:
    return unquote_plus(field.partition(b"=")[0].decode("latin-1"))


def _index(context: PluginContext) -> tuple[Index, Index]:
    plain: Index = {}
    hashed: Index = {}
    # The registry's (consumer, credential) pairs themselves: 10,000 new equal tuples would be ~0.7 MB.
    for pair in context.consumers.credentials("key-auth", KeyCredential):
        credential = pair[1]
        if credential.key is not None:
            plain[credential.key.encode("ascii")] = pair
        else:
            hashed[bytes.fromhex(credential.key_sha256)] = pair
    return plain, hashed
