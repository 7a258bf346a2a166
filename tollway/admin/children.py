"""Parts of an entity with paths of their own: an upstream's targets and a consumer's credentials.
Each change rewrites the parent's row (one store write), so the parent's version is their ETag too."""

from __future__ import annotations

import secrets
from typing import Any

from tollway.admin.common import (
    Call,
    etag,
    expected_version,
    json_object,
    load,
    merge_patch,
    must_find,
    no_placeholders,
    view,
    write,
)
from tollway.admin.errors import ApiError
from tollway.admin.http import Response
from tollway.store.model import Put, Row
from tollway.store.secrets import redact, restore


async def _rewrite(call: Call, parent: Row, data: dict[str, Any]) -> Row:
    expect = expected_version(call.request)
    result = await write(
        call, [Put(parent.kind, data, expect_version=parent.version if expect is None else expect)]
    )
    for change in result.changes:
        if change.row is not None:
            return change.row
    return parent


# -- /upstreams/{name}/targets ---------------------------------------------------------------------------
def _targets(row: Row) -> list[dict[str, Any]]:
    return [t for t in row.data.get("targets") or [] if isinstance(t, dict)]


def _target_index(row: Row, target: str) -> int:
    for i, t in enumerate(_targets(row)):
        if t.get("target") == target:
            return i
    raise ApiError(404, f"upstream {row.key!r} has no target {target!r}")


async def targets(call: Call, upstream: str, target: str | None) -> Response:
    row = must_find(await load(call), "upstreams", upstream)
    method = call.request.method
    if target is None and method in ("GET", "HEAD"):
        return Response(200, {"data": _targets(row), "upstream": row.key}, headers={"ETag": etag(row)})
    if target is None:  # POST: add one
        body = json_object(call.request)
        if any(t.get("target") == body.get("target") for t in _targets(row)):
            raise ApiError(409, f"upstream {row.key!r} already has target {body.get('target')!r}")
        new = await _rewrite(call, row, {**row.data, "targets": [*_targets(row), body]})
        return Response(201, {"data": body, "upstream": view(new)}, headers={"ETag": etag(new)})
    index = _target_index(row, target)
    items = _targets(row)
    if method in ("GET", "HEAD"):
        return Response(200, {"data": items[index], "upstream": row.key}, headers={"ETag": etag(row)})
    if method == "DELETE":
        items.pop(index)
        await _rewrite(call, row, {**row.data, "targets": items})
        return Response(204)
    body = json_object(call.request)
    items[index] = merge_patch(items[index], body) if method == "PATCH" else {"target": target, **body}
    new = await _rewrite(call, row, {**row.data, "targets": items})
    return Response(200, {"data": items[index], "upstream": view(new)}, headers={"ETag": etag(new)})


# -- /consumers/{username}/credentials[/{plugin}[/{index}]] --------------------------------------------
def _credentials(row: Row) -> dict[str, list[dict[str, Any]]]:
    found = row.data.get("credentials")
    return {k: list(v) for k, v in found.items() if isinstance(v, list)} if isinstance(found, dict) else {}


def _shown(row: Row) -> dict[str, Any]:
    return redact("consumers", {"credentials": _credentials(row)})["credentials"]  # type: ignore[no-any-return]


async def credentials(call: Call, username: str, plugin: str | None, index: str | None) -> Response:
    row = must_find(await load(call), "consumers", username)
    method = call.request.method
    creds = _credentials(row)
    if plugin is None:  # GET every credential, secrets redacted
        return Response(200, {"data": _shown(row), "consumer": row.key}, headers={"ETag": etag(row)})
    if index is None and method in ("GET", "HEAD"):
        return Response(200, {"data": _shown(row).get(plugin, []), "consumer": row.key})
    if index is None:  # POST: add a credential; the answer is the only time its secret is shown
        body = json_object(call.request)
        no_placeholders(body)
        if plugin == "key-auth" and not body.get("key") and not body.get("key_sha256"):
            body = {**body, "key": secrets.token_urlsafe(24)}  # generated, as operators expect
        creds[plugin] = [*creds.get(plugin, []), body]
        new = await _rewrite(call, row, {**row.data, "credentials": creds})
        return Response(
            201,
            {"data": body, "index": len(creds[plugin]) - 1, "consumer": new.key},
            headers={"ETag": etag(new)},
        )
    if not index.isdigit() or int(index) >= len(creds.get(plugin, [])):
        raise ApiError(404, f"consumer {row.key!r} has no {plugin} credential {index!r}")
    i = int(index)
    if method in ("GET", "HEAD"):
        return Response(200, {"data": _shown(row)[plugin][i], "index": i, "consumer": row.key})
    if method == "DELETE":
        creds[plugin].pop(i)
        if not creds[plugin]:
            del creds[plugin]
        await _rewrite(call, row, {**row.data, "credentials": creds})
        return Response(204)
    body = json_object(call.request)
    old = creds[plugin][i]
    creds[plugin][i] = restore(merge_patch(old, body) if method == "PATCH" else body, old)
    no_placeholders(creds[plugin][i])
    new = await _rewrite(call, row, {**row.data, "credentials": creds})
    return Response(200, {"data": _shown(new)[plugin][i], "index": i, "consumer": new.key})
