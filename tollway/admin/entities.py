"""Upstreams, services, routes, consumers and plugins: list, get, create, replace, patch, delete —
top level (`/routes/{name}`) and under the entity they belong to (`/services/{name}/routes`,
`/routes/{name}/plugins/{plugin}`).

Every write is one store write (one transaction, one config version) validated whole by `tollway
check`'s code; an entity's version is its ETag, and `If-Match` turns a lost update into 412.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from tollway.admin.common import (
    SINGULAR,
    Call,
    cursor,
    entity_response,
    expected_version,
    find,
    json_object,
    load,
    merge_patch,
    no_placeholders,
    page_size,
    referrers,
    view,
    write,
)
from tollway.admin.errors import ApiError
from tollway.admin.http import Response
from tollway.store.model import Delete, Put, Row, Rows, WriteRefused, entity_key
from tollway.store.secrets import restore

KEY_FIELD = {"upstreams": "name", "services": "name", "routes": "name", "consumers": "username"}
KEY_FIELD["plugins"] = "name"


@dataclass(frozen=True, slots=True)
class Scope:
    """The parent a nested path narrows to: `/services/users/routes` → Scope("service", "users")."""

    field: str
    value: str


def key_for(kind: str, ident: str, scope: Scope | None) -> str:
    """The store key an identifier in a path names (a plugin's key includes its scope)."""
    if kind == "plugins" and scope is not None:
        return entity_key(kind, {"name": ident, scope.field: scope.value})
    return ident


def in_scope(row: Row, scope: Scope | None) -> bool:
    return scope is None or row.data.get(scope.field) == scope.value


def locate(rows: Rows, kind: str, ident: str, scope: Scope | None) -> Row | None:
    row = find(rows, kind, key_for(kind, ident, scope)) or find(rows, kind, ident)
    return row if row is not None and in_scope(row, scope) else None


# -- reads ------------------------------------------------------------------------------------------------
async def list_entities(call: Call, kind: str, scope: Scope | None) -> Response:
    rows = await load(call)
    request = call.request
    size, after = page_size(request), cursor(request)
    tags = [t for t in (request.arg("tags") or "").split(",") if t]
    filters = {f: request.arg(f) for f in ("service", "route", "consumer", "upstream") if request.arg(f)}
    out: list[Row] = []
    more = False
    for row in rows.by_kind[kind].values():  # document order: position grows
        if row.position <= after or not in_scope(row, scope):
            continue
        if any(row.data.get(f) != v for f, v in filters.items()):
            continue
        if tags and not set(tags) <= set(row.data.get("tags") or []):
            continue
        if len(out) == size:
            more = True
            break
        out.append(row)
    body: dict[str, Any] = {"data": [view(r) for r in out], "next": None, "version": rows.version}
    if more:
        query = {k: v[-1] for k, v in request.query.items() if k != "offset"}
        query["offset"] = str(out[-1].position)
        path = "/".join(quote(segment, safe="") for segment in request.path)
        body["next"] = f"/{path}?{urlencode(query)}"
    return Response(200, body)


async def get_entity(call: Call, kind: str, ident: str, scope: Scope | None) -> Response:
    row = locate(await load(call), kind, ident, scope)
    if row is None:
        raise ApiError(404, f"no {SINGULAR[kind]} {ident!r}")
    if call.request.headers.get("if-none-match", "").strip() in (f'"{row.version}"', f'W/"{row.version}"'):
        return Response(304, None, headers={"ETag": f'"{row.version}"'})
    return entity_response(200, row)


# -- writes -----------------------------------------------------------------------------------------------
def _scoped(data: dict[str, Any], scope: Scope | None) -> dict[str, Any]:
    if scope is None:
        return data
    given = data.get(scope.field)
    if given is not None and given != scope.value:
        raise ApiError(400, f"{scope.field}: the body says {given!r}, the path {scope.value!r}")
    return {**data, scope.field: scope.value}


def _key(kind: str, data: dict[str, Any]) -> str:
    try:
        return entity_key(kind, data)
    except WriteRefused:
        raise ApiError(
            400,
            f"a {SINGULAR[kind]} needs a {KEY_FIELD[kind]}",
            errors=[{"path": KEY_FIELD[kind], "message": "field required", "entity": "", "line": ""}],
        ) from None


async def create(call: Call, kind: str, scope: Scope | None) -> Response:
    data = _scoped(json_object(call.request), scope)
    no_placeholders(data)
    key = _key(kind, data)
    rows = await load(call)
    existing = rows.by_kind[kind].get(key)
    if existing is not None:
        raise ApiError(409, f"{SINGULAR[kind]} {key!r} already exists (PUT replaces it)", id=existing.id)
    result = await write(call, [Put(kind, data, expect_version=0)])
    return entity_response(201, _row_of(result.changes, kind, key), clear=True)


async def replace(call: Call, kind: str, ident: str, scope: Scope | None) -> Response:
    """PUT: replace the entity, or create it under that name (an upsert)."""
    rows = await load(call)
    existing = locate(rows, kind, ident, scope)
    data = _scoped(json_object(call.request), scope)
    field = KEY_FIELD[kind]
    if existing is not None:
        data = {**data, field: data.get(field, existing.data.get(field))}
        data = restore(data, existing.data)
        no_placeholders(data)
    else:
        data = {field: ident, **data} if not (kind == "plugins" and "@" in ident) else data
        no_placeholders(data)
    key = _key(kind, data)
    wanted = existing.key if existing is not None else key_for(kind, ident, scope)
    if key != wanted:
        raise ApiError(400, f"{field}: the body names {key!r}, the path {wanted!r} (renaming is not a PUT)")
    expect = expected_version(call.request)
    result = await write(call, [Put(kind, data, expect_version=expect)])
    if not result.changes:  # the same data again: nothing written, the entity as it is
        return entity_response(200, rows.by_kind[kind][key])
    return entity_response(200 if existing else 201, _row_of(result.changes, kind, key))


async def patch(call: Call, kind: str, ident: str, scope: Scope | None) -> Response:
    rows = await load(call)
    existing = locate(rows, kind, ident, scope)
    if existing is None:
        raise ApiError(404, f"no {SINGULAR[kind]} {ident!r}")
    body = json_object(call.request)
    data = restore(merge_patch(existing.data, body), existing.data)
    no_placeholders(data)
    if not isinstance(data, dict) or _key(kind, _scoped(data, scope)) != existing.key:
        raise ApiError(400, f"{KEY_FIELD[kind]}: a PATCH cannot rename (or re-scope) an entity")
    expect = expected_version(call.request)
    result = await write(
        call, [Put(kind, data, expect_version=existing.version if expect is None else expect)]
    )
    if not result.changes:
        return entity_response(200, existing)
    return entity_response(200, _row_of(result.changes, kind, existing.key))


async def delete(call: Call, kind: str, ident: str, scope: Scope | None) -> Response:
    rows = await load(call)
    existing = locate(rows, kind, ident, scope)
    if existing is None:
        raise ApiError(404, f"no {SINGULAR[kind]} {ident!r}")
    using = referrers(rows, kind, existing.key)
    if using:
        names = ", ".join(f"{r['kind']} {r['name']!r}" for r in using)
        raise ApiError(409, f"{SINGULAR[kind]} {existing.key!r} is used by {names}", referrers=using)
    await write(call, [Delete(kind, existing.key, expect_version=expected_version(call.request))])
    return Response(204)


def _row_of(changes: list[Any], kind: str, key: str) -> Row:
    for change in changes:
        if change.kind == kind and change.key == key and change.row is not None:
            return change.row  # type: ignore[no-any-return]
    raise AssertionError(f"the write did not change {kind} {key!r}")
