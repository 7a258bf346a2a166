"""An asynchronous JWKS fetcher: signing keys from an identity provider's JWKS URL, cached.

pyjwt's `PyJWKClient` fetches synchronously (it would stop the event loop for a whole HTTP round trip),
so this module fetches with the gateway's own HTTP client (tollway.protocol.client) and keeps:

- last-known-good keys: a failed or garbled refresh never empties the set;
- a refresh when the set is older than `cache_ttl`, in the background (requests keep using the keys
  they have), and one when a token names a `kid` the set lacks — at most once per `min_refresh_interval`
  (a flood of tokens with made-up kids costs one fetch per interval), shared by every waiting request;
- bounds: `timeout` for the whole fetch, `max_bytes` for the document, `MAX_KEYS` keys.

Sources are kept per process by URL and settings, so a config reload keeps fetched keys.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from tollway.protocol.client import HttpClientError, request

log = logging.getLogger("tollway.plugins.builtin.jwks")
MAX_KEYS = 100
_JWKS_HEADERS = ((b"Accept", b"application/json"), (b"User-Agent", b"tollway-jwks"))


class JwksError(Exception):
    pass


class JwksSource:
    def __init__(
        self,
        url: str,
        cache_ttl: float,
        min_refresh_interval: float,
        timeout: float,
        max_bytes: int = 256 * 1024,
    ) -> None:
        self.url = url
        self.cache_ttl = cache_ttl
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.keys: dict[str | None, PyJWK] = {}  # by kid (None: a key without one)
        self.fetched_at = 0.0  # monotonic time of the last successful fetch
        self.attempted_at = -1e9  # of the last attempt, successful or not
        self.fetches = 0
        self.failures = 0
        self._refreshing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<JwksSource {self.url} keys={len(self.keys)} fetches={self.fetches} failures={self.failures}>"
        )

    def cached(self, kid: str | None) -> PyJWK | None:
        """The key for `kid` if known now (no I/O); starts a background refresh when the set is stale."""
        if self.keys and time.monotonic() - self.fetched_at > self.cache_ttl:
            self._refresh_soon()
        return self._find(kid)

    async def get(self, kid: str | None) -> PyJWK | None:
        """The key for `kid`, fetching the set first if it is unknown (and a fetch is allowed now)."""
        key = self._find(kid)
        if key is not None:
            return key
        if time.monotonic() - self.attempted_at < self.min_refresh_interval and self._refreshing is None:
            return None  # refreshed moments ago and still unknown: a made-up or retired kid
        task = self._refresh_soon()
        await asyncio.shield(task)
        return self._find(kid)

    def _find(self, kid: str | None) -> PyJWK | None:
        keys = self.keys
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))  # a token without kid, and only one key to try
        return keys.get(kid)

    def _refresh_soon(self) -> asyncio.Task[None]:
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return task

    async def _refresh(self) -> None:
        self.attempted_at = time.monotonic()
        self.fetches += 1
        try:
            document = await fetch(self.url, self.max_bytes, self.timeout)
            keys = parse_jwks(document)
        except Exception as exc:  # network, TLS, HTTP, JSON: whatever it was, the old keys stay
            self.failures += 1
            log.warning("JWKS %s: refresh failed, keeping %d known keys: %s", self.url, len(self.keys), exc)
        else:
            self.keys = keys
            self.fetched_at = time.monotonic()
        finally:
            self._refreshing = None


def parse_jwks(document: bytes) -> dict[str | None, PyJWK]:
    """Usable asymmetric signing keys of a JWKS document, by kid; JwksError if it has none."""
    try:
        data = orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        raise JwksError(f"not JSON: {exc}") from exc
    items = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise JwksError('no "keys" list')
    keys: dict[str | None, PyJWK] = {}
    for item in items[:MAX_KEYS]:
        if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # "oct" (shared secrets) never comes from a public document
        if item.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(item)
        except (PyJWKError, ValueError, TypeError):
            continue
        kid = item.get("kid")
        keys[kid if isinstance(kid, str) else None] = key
    if not keys:
        raise JwksError("no usable signing keys")
    return keys


async def fetch(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """GET `url` (http or https, tollway.protocol.client), following no redirects; the body if the
    status is 200."""
    try:
        response = await request(url, headers=_JWKS_HEADERS, timeout=timeout, max_body=max_bytes)
    except HttpClientError as exc:
        raise JwksError(str(exc)) from None
    if response.status != 200:
        raise JwksError(f"status {response.status}")
    return response.body


_SOURCES: dict[tuple[str, float, float, float], JwksSource] = {}


def source_for(url: str, cache_ttl: float, min_refresh_interval: float, timeout: float) -> JwksSource:
    """The process's source for these settings (kept across config reloads)."""
    key = (url, cache_ttl, min_refresh_interval, timeout)
    found = _SOURCES.get(key)
    if found is None:
        if len(_SOURCES) >= 256:
            _SOURCES.clear()
        found = _SOURCES[key] = JwksSource(url, cache_ttl, min_refresh_interval, timeout)
    return found
