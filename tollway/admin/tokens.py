"""Admin API tokens: random, shown once at creation, stored as their SHA-256 (a fast hash is right
here: a token is 256 random bits, so there is nothing to brute-force that a slow hash would protect)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from tollway.store.base import AdminToken, ConfigStore

ROLES = ("admin", "read-only")
PREFIX = "tw_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


async def create_token(store: ConfigStore, name: str, role: str) -> str:
    """Store a new token under `name` (replacing one of that name) and return it in clear: the only time."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    token = PREFIX + secrets.token_urlsafe(32)
    await store.put_admin_token(AdminToken(name, role, hash_token(token), time.time()))
    return token


async def identify(store: ConfigStore, authorization: str | None) -> AdminToken | None:
    """The token an `Authorization: Bearer …` header carries, if it is one the store holds."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    digest = hash_token(value.strip())
    for token in await store.admin_tokens():
        if hmac.compare_digest(token.token_hash, digest):
            return token
    return None
