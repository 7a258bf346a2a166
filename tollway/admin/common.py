"""What every admin API handler shares: the call's context, reading a JSON body, ETags, finding an
entity by id or name, and writing through the store with the answers the store's errors map to."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tollway.admin.errors import ApiError, refused
from tollway.admin.http import Request, Response
from tollway.errors import TollwayError
from tollway.store.base import AuditContext, ConfigStore, WriteResult
from tollway.store.model import KINDS, Conflict, NotFound, Op, Row, Rows, WriteRefused
from tollway.store.secrets import REDACTED, contains_redacted, redact

SINGULAR = {"upstreams": "upstream", "services": "service", "routes": "route", "consumers": "consumer"}
SINGULAR["plugins"] = "plugin"
# Fields of a kind that name an entity of another kind: filters (?service=), nested paths, and the
# referrers a delete answers 409 with.
PARENT_FIELDS: dict[str, dict[str, str]] = {
    "services": {"upstreams": "upstream"},
    "routes": {"services": "service"},
    "plugins": {"services": "service", "routes": "route", "consumers": "consumer"},
}
audit_log = logging.getLogger("tollway.audit")  # one JSON line per admin write, beside the store's rows
_ETAG = re.compile(r'^\s*(?:W/)?"?(\d+)"?\s*$')


@dataclass(slots=True)
class Call:
    """One admin API call: the request, who makes it, and the store it acts on."""

    request: Request
    store: ConfigStore
    actor: str

    def audit(self) -> AuditContext:
        return AuditContext(self.actor, self.request.client, self.request.request_id)


MAX_DEPTH = 64  # nesting levels a body may have: config needs a handful; recursion needs a bound


def json_body(request: Request) -> Any:
    if not request.body.strip():
        raise ApiError(400, "a JSON body is required")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    check_depth(body)
    return body


def check_depth(value: Any) -> None:
    """Refuse documents nested deeper than MAX_DEPTH (iteratively: the check itself never recurses), so
    validation, merge patches and redaction, which recurse, never exhaust the stack on client input."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]


def json_object(request: Request) -> dict[str, Any]:
    body = json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object (the entity, as in the config file)")
    return body


def no_placeholders(data: Any) -> None:
    """REDACTED left in a body after `restore`: a new entity (no stored secret for it to stand for), or a
    list whose items changed (which stored secret it stands for is ambiguous)."""
    if contains_redacted(data):
        raise ApiError(
            400,
            f"{REDACTED!r} stands for a stored secret, and there is none at that place (a new entity, or "
            "a list that gained or lost items): send the real value, or change one credential at "
            "/consumers/{name}/credentials/{plugin}/{index}",
        )


def expected_version(request: Request) -> int | None:
    """`If-Match: "N"` → N; `If-Match: *` → None (any version); `If-None-Match: *` → 0 (must not exist)."""
    if request.headers.get("if-none-match", "").strip() == "*":
        return 0
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    found = _ETAG.match(value)
    if found is None:
        raise ApiError(400, f'If-Match: expected an ETag of this API ("3"), not {value!r}')
    return int(found[1])


def etag(row: Row) -> str:
    return f'"{row.version}"'


def view(row: Row, clear: bool = False) -> dict[str, Any]:
    """An entity as the API shows it: its data exactly as in a config file, secrets redacted (`clear`:
    the answer to the call that created it, which already holds them)."""
    return {
        "id": row.id,
        "kind": SINGULAR[row.kind],
        "name": row.key,
        "version": row.version,
        "data": row.data if clear else redact(row.kind, row.data),
    }


def entity_response(status: int, row: Row, clear: bool = False) -> Response:
    return Response(status, view(row, clear), headers={"ETag": etag(row)})


def find(rows: Rows, kind: str, ident: str) -> Row | None:
    """An entity by its key (name) or its id."""
    found = rows.by_kind[kind].get(ident)
    if found is not None:
        return found
    return next((row for row in rows.by_kind[kind].values() if row.id == ident), None)


def must_find(rows: Rows, kind: str, ident: str) -> Row:
    row = find(rows, kind, ident)
    if row is None:
        raise ApiError(404, f"no {SINGULAR[kind]} {ident!r}")
    return row


def referrers(rows: Rows, kind: str, key: str) -> list[dict[str, str]]:
    """The entities whose fields name this one (a delete would leave them dangling)."""
    out = []
    for other in KINDS:
        field = PARENT_FIELDS.get(other, {}).get(kind)
        if field is None:
            continue
        out += [
            {"kind": SINGULAR[other], "name": row.key, "id": row.id}
            for row in rows.by_kind[other].values()
            if row.data.get(field) == key
        ]
    return out


async def write(call: Call, ops: Sequence[Op]) -> WriteResult:
    """Write through the store, with the audit context; the store's refusals become API errors."""
    try:
        result = await call.store.write(ops, author=call.actor, audit=call.audit())
    except WriteRefused as exc:
        raise refused(exc.issues) from None
    except Conflict as exc:
        raise ApiError(412, f"precondition failed: {exc}") from None
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except TollwayError as exc:  # StoreError: the database is unreachable
        raise ApiError(exc.status, f"{exc.message}: {exc}") from None
    if result.changes:
        line = {
            "actor": call.actor,
            "address": call.request.client,
            "request_id": call.request.request_id,
            "request": f"{call.request.method} {call.request.target}",
            "version": result.version,
            "changes": [{"action": c.action, "kind": c.kind, "name": c.key} for c in result.changes],
        }
        audit_log.info("%s", orjson.dumps({"audit": line}).decode())
    return result


async def load(call: Call) -> Rows:
    try:
        return await call.store.load()
    except TollwayError as exc:
        raise ApiError(exc.status, f"{exc.message}: {exc}") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null deletes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def page_size(request: Request, default: int = 100, largest: int = 1000) -> int:
    text = request.arg("size")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= largest:
        raise ApiError(400, f"size: must be a whole number from 1 to {largest}")
    return int(text)


def cursor(request: Request) -> int:
    text = request.arg("offset")
    if text is None or text == "":
        return -1
    if not text.isdigit():
        raise ApiError(400, "offset: not a cursor this API gave (use the `next` link)")
    return int(text)
