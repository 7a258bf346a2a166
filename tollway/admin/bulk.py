"""`/config` (the whole declarative config: export, diff, apply — the engine of `tollway config
diff/apply`), `/audit` (who changed what) and `/cluster` (the nodes and their applied versions)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import orjson
import yaml

from tollway.admin.common import (
    MAX_DEPTH,
    SINGULAR,
    Call,
    check_depth,
    json_body,
    load,
    no_placeholders,
    page_size,
    write,
)
from tollway.admin.errors import ApiError, refused
from tollway.admin.http import Response
from tollway.errors import TollwayError
from tollway.store.base import AuditEntry, AuditQuery
from tollway.store.model import (
    KINDS,
    Rows,
    WriteRefused,
    diff,
    entity_key,
    ops_from_document,
    plan_write,
    prune_ops,
)
from tollway.store.secrets import redact, restore


def _flag(call: Call, name: str) -> bool:
    value = call.request.arg(name)
    if value in (None, "false", "0", "no"):
        return False
    if value in ("", "true", "1", "yes"):
        return True
    raise ApiError(400, f"{name}: expected true or false, not {value!r}")


def _document(call: Call) -> dict[str, Any]:
    """The body: JSON, or YAML with a YAML content type (the file `tollway config apply` takes)."""
    ctype = call.request.headers.get("content-type", "")
    if "yaml" in ctype:
        try:
            doc = yaml.load(call.request.body.decode("utf-8"), Loader=_NoAliasLoader)  # a SafeLoader
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed YAML: {exc}") from None
        except RecursionError:
            raise ApiError(400, f"the body is nested more than {MAX_DEPTH} levels deep") from None
    else:
        doc = json_body(call.request)
    check_depth(doc)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a config document: {services: [...], routes: [...], ...}")
    unknown = sorted(set(doc) - {*KINDS, "gateway"})
    if unknown:
        raise ApiError(400, f"unknown section(s) {', '.join(map(repr, unknown))} (known: {', '.join(KINDS)})")
    doc.pop("gateway", None)  # node settings stay in each node's file
    return doc


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type stubs here
    """YAML without aliases: `*name` can make a small document a huge one (billion laughs); a config
    sent to the API has no need for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted by the admin API", event.start_mark
            )
        return super().compose_node(parent, index)


def _with_stored_secrets(doc: dict[str, Any], rows: Rows) -> dict[str, Any]:
    """An exported document (secrets redacted) applied back keeps the stored secrets."""
    out = dict(doc)
    for kind in KINDS:
        items = doc.get(kind)
        if isinstance(items, list):
            out[kind] = [_restored(kind, item, rows) for item in items]
    return out


def _restored(kind: str, item: Any, rows: Rows) -> Any:
    if not isinstance(item, dict):
        return item  # ops_from_document says what is wrong with it
    try:
        old = rows.by_kind[kind].get(entity_key(kind, item))
    except WriteRefused:
        return item
    return restore(item, old.data) if old is not None else item


async def export(call: Call) -> Response:
    rows = await load(call)
    doc = {kind: [redact(kind, r.data) for r in rows.by_kind[kind].values()] for kind in KINDS}
    if "yaml" in call.request.headers.get("accept", ""):
        text = f"# store version {rows.version}\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        return Response(200, text.encode(), content_type="application/yaml")
    return Response(200, {"version": rows.version, **doc})


async def apply(call: Call) -> Response:
    """Make the store hold the document's entities in one transaction (`?prune=true`: and nothing else);
    `?dry_run=true` answers what would change, validated, without writing."""
    dry_run, prune = _flag(call, "dry_run"), _flag(call, "prune")
    rows = await load(call)
    try:
        doc = _with_stored_secrets(_document(call), rows)
        no_placeholders(doc)
        ops = ops_from_document(doc)
        if prune:
            ops += prune_ops(rows, doc)
        if dry_run:
            plan_write(rows, ops, rows.version + 1)  # validated exactly as the write would be
            changes = [
                {"action": d.action, "kind": SINGULAR[d.kind], "name": d.key, "fields": list(d.fields)}
                for d in diff(rows, doc, prune)
            ]
            return Response(200, {"dry_run": True, "version": rows.version, "changes": changes})
    except WriteRefused as exc:
        raise refused(exc.issues) from None
    except TollwayError as exc:  # a Conflict or NotFound cannot come from Puts; kept for completeness
        raise ApiError(exc.status, str(exc)) from None
    result = await write(call, ops)
    changes = [{"action": c.action, "kind": SINGULAR[c.kind], "name": c.key} for c in result.changes]
    return Response(200, {"dry_run": False, "version": result.version, "changes": changes})


# -- /audit -----------------------------------------------------------------------------------------------
def _number(call: Call, name: str) -> float | None:
    value = call.request.arg(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ApiError(400, f"{name}: expected a number, not {value!r}") from None


async def audit(call: Call) -> Response:
    kind = call.request.arg("kind")
    plural = {v: k for k, v in SINGULAR.items()}.get(kind or "", kind)
    if plural is not None and plural not in KINDS:
        raise ApiError(400, f"kind: one of {', '.join(SINGULAR.values())}, not {kind!r}")
    before = _number(call, "offset")
    size = page_size(call.request)
    query = AuditQuery(
        kind=plural,
        key=call.request.arg("name"),
        actor=call.request.arg("actor"),
        since=_number(call, "since"),
        before_seq=int(before) if before is not None else None,
        limit=size + 1,
    )
    try:
        entries = await call.store.audit_log(query)
    except TollwayError as exc:
        raise ApiError(exc.status, f"{exc.message}: {exc}") from None
    more = len(entries) > size
    entries = entries[:size]
    next_link = None
    if more:
        args = {k: v[-1] for k, v in call.request.query.items() if k != "offset"}
        args["offset"] = str(entries[-1].seq)
        next_link = "/audit?" + urlencode(args)
    return Response(200, {"data": [audit_json(e) for e in entries], "next": next_link})


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "version": entry.version,
        "at": entry.at,
        "actor": entry.actor,
        "address": entry.address,
        "request_id": entry.request_id,
        "action": entry.action,
        "kind": SINGULAR.get(entry.kind, entry.kind),
        "name": entry.key,
        "id": entry.entity_id,
        "before": entry.before,
        "after": entry.after,
    }


def audit_line(entry: dict[str, Any]) -> str:
    return orjson.dumps({"audit": entry}).decode()


# -- /cluster ---------------------------------------------------------------------------------------------
async def cluster(call: Call) -> Response:
    try:
        version = await call.store.version()
        nodes = await call.store.nodes()
    except TollwayError as exc:
        raise ApiError(exc.status, f"{exc.message}: {exc}") from None
    now = time.time()
    return Response(
        200,
        {
            "store_version": version,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "address": n.address,
                    "tollway_version": n.software_version,
                    "config_version": n.config_version,
                    "behind": n.config_version < version,
                    "source": n.source,
                    "error": n.error,
                    "seconds_since_heartbeat": round(max(0.0, now - n.last_seen), 1),
                }
                for n in nodes
            ],
        },
    )
