"""Which fields of an entity are secrets, so that what leaves the store for people — admin API answers,
the audit log — never carries them in clear.

Consumers' credentials hold the secrets (key-auth keys, basic-auth password hashes, JWT HMAC secrets);
plugin configs may hold some too (a Redis password). A secret is replaced by REDACTED; a write that
sends REDACTED back (a client that read an entity, changed another field and wrote it whole) keeps the
stored secret at that place (`restore`), so a read-modify-write never overwrites a secret with the
placeholder.
"""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"
# Credential fields that are secrets, whatever the plugin. `key` is jwt's issuer name, not a secret,
# but key-auth's key is one: credentials redact `key` except jwt's.
_CREDENTIAL_SECRETS = frozenset({"key", "key_sha256", "password", "password_hash", "secret", "private_key"})
_PUBLIC_BY_PLUGIN = {"jwt": frozenset({"key"})}
# Anywhere in a plugin's config.
_CONFIG_SECRETS = frozenset({"password", "secret", "client_secret", "private_key", "api_key", "token"})


def redact(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of an entity's data with every secret replaced by REDACTED (the input is not changed)."""
    out: dict[str, Any] = _redact_config(data)
    if kind == "consumers" and isinstance(data.get("credentials"), dict):
        out["credentials"] = {
            plugin: [_redact_credential(plugin, c) for c in creds] if isinstance(creds, list) else creds
            for plugin, creds in data["credentials"].items()
        }
    return out


def _redact_credential(plugin: str, credential: Any) -> Any:
    if not isinstance(credential, dict):
        return credential
    public = _PUBLIC_BY_PLUGIN.get(plugin, frozenset())
    return {
        k: REDACTED if k in _CREDENTIAL_SECRETS and k not in public and v is not None else v
        for k, v in credential.items()
    }


def _redact_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if k in _CONFIG_SECRETS and isinstance(v, str) else _redact_config(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_config(v) for v in value]
    return value


def restore(new: Any, old: Any) -> Any:
    """`new` with every REDACTED replaced by the value at the same place in `old` (when there is one:
    a REDACTED left over cannot be matched, and the caller refuses it)."""
    if new == REDACTED:
        return old if isinstance(old, str) else new
    if isinstance(new, dict):
        base = old if isinstance(old, dict) else {}
        return {k: restore(v, base.get(k)) for k, v in new.items()}
    if isinstance(new, list):
        # Only a list of the same length is matched item by item: in a list that lost or gained items
        # (a credential removed), index i may be another item, and its secret must not move over.
        base_list = old if isinstance(old, list) and len(old) == len(new) else []
        return [restore(v, base_list[i] if i < len(base_list) else None) for i, v in enumerate(new)]
    return new


def contains_redacted(value: Any) -> bool:
    if value == REDACTED:
        return True
    if isinstance(value, dict):
        return any(contains_redacted(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_redacted(v) for v in value)
    return False
