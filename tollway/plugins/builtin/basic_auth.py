"""basic-auth: HTTP Basic credentials checked against slow, salted password hashes.

Consumers' credentials hold a username and a `password_hash` (bcrypt, argon2 or PBKDF2-SHA256; see
`tollway.plugins.builtin.passwords` and `tollway hash-password`) — never a password. A check costs tens of
milliseconds by design, so:

- it runs in a small thread pool (the hash libraries release the GIL), never on the event loop;
- concurrent requests with the same credentials share one check;
- a success is cached for `cache_ttl`, keyed by a keyed BLAKE2 hash of the Authorization value (a
  per-process random key, so the cache holds nothing an attacker could test passwords against);
  a different password is a different key, and failures are never cached;
- an unknown username is checked against a real hash anyway, so the answer takes as long as for a
  known one; and past `max_pending_checks` checks in flight, requests get 503 instead of queueing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from tollway.config.types import Duration
from tollway.plugins.base import PluginConfig, PluginContext
from tollway.plugins.builtin.auth import AuthConfig, AuthPlugin
from tollway.plugins.builtin.passwords import Verifier, check_hash, verifier
from tollway.plugins.consumers import Consumer, identify
from tollway.proxy.pdk import Response, error_response

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from tollway.proxy.pdk import RequestContext

_SECRET = os.urandom(32)  # keys the cache: per process, never stored
_EXECUTOR: ThreadPoolExecutor | None = None
_AUTHORIZATION = b"authorization"


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tollway-passwords")
    return _EXECUTOR


class BasicAuthConfig(AuthConfig):
    cache_ttl: Duration = Field(
        60.0, ge=0, description="how long a successful check is remembered; 0 = never"
    )
    cache_size: int = Field(10000, ge=0, description="successful checks remembered (per worker)")
    max_pending_checks: int = Field(
        64, ge=1, description="password checks in flight per worker; more get 503"
    )


class BasicCredential(PluginConfig):
    username: str = Field(min_length=1, max_length=256, pattern=r"^[^:\x00-\x1f\x7f]+$")
    password_hash: str = Field(description="bcrypt, argon2 or PBKDF2-SHA256 hash (tollway hash-password)")

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "plaintext passwords are not accepted: store `password_hash` "
                "(create one with: tollway hash-password)"
            )
        return data

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        return check_hash(value)

    def identity(self) -> Hashable:
        return self.username


class _User:
    __slots__ = ("consumer", "credential", "verify")

    def __init__(self, consumer: Consumer, credential: BasicCredential, verify: Verifier) -> None:
        self.consumer = consumer
        self.credential = credential
        self.verify = verify


class BasicAuth(AuthPlugin[BasicAuthConfig]):
    name = "basic-auth"
    priority = 2400
    consumer_credential = BasicCredential
    scheme = "Basic"

    def __init__(self, config: BasicAuthConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._users: dict[str, _User] = context.shared(("basic-auth", "users"), lambda: _users(context))
        first = next(iter(self._users.values()), None)
        self._dummy: Verifier | None = first.verify if first is not None else None
        self._ttl = config.cache_ttl
        self._size = config.cache_size
        self._cache: dict[bytes, tuple[float, _User]] = {}
        self._checking: dict[bytes, asyncio.Future[_User | None]] = {}
        self._max_pending = config.max_pending_checks
        self._hide = config.hide_credentials

    def access(self, ex: RequestContext) -> Response | Awaitable[Response | None] | None:
        if self.anonymous is not None and ex.credential is not None:
            return None
        header = ex.pop_header(_AUTHORIZATION) if self._hide else ex.header_bytes(_AUTHORIZATION)
        if header is None or header[:6].lower() != b"basic ":
            return self.reject(ex, "missing")
        token = header[6:].strip()
        key = hashlib.blake2b(token, key=_SECRET, digest_size=20).digest()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > time.monotonic():
                identify(ex, cached[1].consumer, cached[1].credential)
                return None
            del self._cache[key]
        return self._check(ex, key, token)

    async def _check(self, ex: RequestContext, key: bytes, token: bytes) -> Response | None:
        pending = self._checking.get(key)
        if pending is None:
            if len(self._checking) >= self._max_pending:
                return error_response(
                    503, "authentication is busy, retry later", ex.request_id.decode("latin-1")
                )
            pending = self._checking[key] = asyncio.get_running_loop().create_future()
            try:
                user = await self._verify(token)
            except Exception as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                raise
            finally:
                del self._checking[key]
            pending.set_result(user)
        else:
            user = await asyncio.shield(pending)
        if user is None:
            return self.reject(ex)
        self._remember(key, user)
        identify(ex, user.consumer, user.credential)
        return None

    async def _verify(self, token: bytes) -> _User | None:
        try:
            decoded = base64.b64decode(token, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, colon, password = decoded.partition(":")
        if not colon:
            return None
        user = self._users.get(username)
        check = user.verify if user is not None else self._dummy  # the same cost either way
        if check is None:
            return None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(_executor(), check, password.encode("utf-8"))
        return user if ok and user is not None else None

    def _remember(self, key: bytes, user: _User) -> None:
        if not self._ttl or not self._size:
            return
        cache = self._cache
        if len(cache) >= self._size:
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = (time.monotonic() + self._ttl, user)


def _users(context: PluginContext) -> dict[str, _User]:
    return {
        credential.username: _User(consumer, credential, verifier(credential.password_hash))
        for consumer, credential in context.consumers.credentials("basic-auth", BasicCredential)
    }
