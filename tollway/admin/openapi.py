"""The OpenAPI 3.1 document of the admin API, generated from the config's own pydantic models (the
schema `tollway check` validates with), and a browsable page that renders it without any CDN.

Request bodies reference the models; answers carry the entity's data as an object (what was written,
secrets redacted), described by the same model's name.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tollway import __version__
from tollway.config.schema import Consumer, PluginInstance, Route, Service
from tollway.config.upstreams import Target, Upstream

MODELS: dict[str, type[BaseModel]] = {
    "upstreams": Upstream,
    "services": Service,
    "routes": Route,
    "consumers": Consumer,
}
MODELS["plugins"] = PluginInstance
_NESTED = {"services": ("routes", "plugins"), "routes": ("plugins",), "consumers": ("plugins",)}
_NESTED["upstreams"] = ("services",)
_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, ok: str, schema: dict[str, Any] | None, body: str | None = None, **more: Any) -> Any:
    responses: dict[str, Any] = {"default": _json(_ERROR, "an error: {message, errors, request_id}")}
    responses[ok] = _json(schema, summary) if schema is not None else {"description": summary}
    op: dict[str, Any] = {"summary": summary, "responses": responses, **more}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


_PAGE = [
    {"name": "size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "offset", "in": "query", "schema": {"type": "string"}, "description": "from `next`"},
    {"name": "tags", "in": "query", "schema": {"type": "string"}, "description": "a,b: carries both"},
]
_IF_MATCH = [{"name": "If-Match", "in": "header", "schema": {"type": "string"}, "description": 'ETag "N"'}]


def _param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _collection(model: str, what: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "parameters": params,
        "get": _op(f"list {what}", "200", _ref("Page"), parameters=_PAGE),
        "post": _op(f"create a {what[:-1]}", "201", _ref("Entity"), body=model),
    }


def _item(model: str, what: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    get = _op(f"a {what} by id or name", "200", _ref("Entity"))
    get["responses"]["304"] = {"description": "not modified (If-None-Match named its ETag)"}
    put = _op(f"replace a {what}", "200", _ref("Entity"), body=model, parameters=_IF_MATCH)
    put["responses"]["201"] = _json(_ref("Entity"), f"created a {what} of that name")
    return {
        "parameters": params,
        "get": get,
        "put": put,
        "patch": _op(
            f"change a {what} (JSON merge patch)",
            "200",
            _ref("Entity"),
            parameters=_IF_MATCH,
            requestBody={
                "required": True,
                "content": {
                    "application/merge-patch+json": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
        ),
        "delete": _op(f"delete a {what} (409 while others refer to it)", "204", None, parameters=_IF_MATCH),
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [*MODELS.values(), Target]
    _, defs = models_json_schema(
        [(model, "validation") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas.update(_SHAPES)
    paths: dict[str, Any] = {}
    for kind, model in MODELS.items():
        name = model.__name__
        paths[f"/{kind}"] = _collection(name, kind, [])
        paths[f"/{kind}/{{ident}}"] = _item(name, kind[:-1], [_param("ident")])
        for child in _NESTED.get(kind, ()):
            child_model = MODELS[child].__name__
            params = [_param("parent")]
            paths[f"/{kind}/{{parent}}/{child}"] = _collection(child_model, child, params)
            paths[f"/{kind}/{{parent}}/{child}/{{ident}}"] = _item(
                child_model, child[:-1], [*params, _param("ident")]
            )
    paths.update(_other_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tollway admin API", "version": __version__, "description": "docs/admin-api.md"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def _other_paths() -> dict[str, Any]:
    up, consumer = [_param("parent")], [_param("parent")]
    obj = {"type": "object"}
    return {
        "/upstreams/{parent}/targets": {
            "parameters": up,
            "get": _op("an upstream's targets", "200", obj),
            "post": _op("add a target", "201", obj, body="Target"),
        },
        "/upstreams/{parent}/targets/{target}": {
            "parameters": [*up, _param("target")],
            "get": _op("one target", "200", obj),
            "put": _op("replace a target", "200", obj, body="Target"),
            "delete": _op("remove a target", "204", None),
        },
        "/consumers/{parent}/credentials": {
            "parameters": consumer,
            "get": _op("credentials, redacted", "200", obj),
        },
        "/consumers/{parent}/credentials/{plugin}": {
            "parameters": [*consumer, _param("plugin")],
            "get": _op("credentials of one plugin, redacted", "200", obj),
            "post": _op(
                "add a credential (its secret is shown in this answer only)", "201", obj, body="Credential"
            ),
        },
        "/consumers/{parent}/credentials/{plugin}/{index}": {
            "parameters": [*consumer, _param("plugin"), _param("index")],
            "get": _op("one credential, redacted", "200", obj),
            "delete": _op("remove a credential", "204", None),
        },
        "/config": {
            "get": _op("the whole config (secrets redacted)", "200", obj),
            "post": _op(
                "apply a declarative config in one transaction",
                "200",
                _ref("Applied"),
                body="Document",
                parameters=[
                    {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "prune", "in": "query", "schema": {"type": "boolean"}},
                ],
            ),
        },
        "/audit": {
            "get": _op(
                "the audit log, newest first",
                "200",
                obj,
                parameters=[
                    *_PAGE[:2],
                    *(
                        {"name": n, "in": "query", "schema": {"type": "string"}}
                        for n in ("kind", "name", "actor")
                    ),
                    {"name": "since", "in": "query", "schema": {"type": "number"}},
                ],
            )
        },
        "/cluster": {"get": _op("nodes and their applied config versions", "200", obj)},
        "/health": {"get": _op("this node's upstream health (targets, checks, ejections)", "200", obj)},
    }


_SHAPES: dict[str, Any] = {
    "Entity": {
        "type": "object",
        "required": ["id", "kind", "name", "version", "data"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "kind": {"enum": ["upstream", "service", "route", "consumer", "plugin"]},
            "name": {"type": "string"},
            "version": {"type": "integer", "description": "the config version that last wrote it; the ETag"},
            "data": {"type": "object", "description": "the entity as in the config file, secrets redacted"},
        },
    },
    "Page": {
        "type": "object",
        "required": ["data", "next"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Entity"}},
            "next": {"type": ["string", "null"]},
            "version": {"type": "integer"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["message"],
        "properties": {
            "message": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string"},
                        "message": {"type": "string"},
                        "entity": {"type": "string"},
                    },
                },
            },
        },
    },
    "Credential": {"type": "object", "description": "as the plugin takes it, e.g. key-auth {key}"},
    "Document": {
        "type": "object",
        "description": "a declarative config: the entity sections of a config file",
        "properties": {k: {"type": "array", "items": {"type": "object"}} for k in (*MODELS, "gateway")},
    },
    "Applied": {
        "type": "object",
        "required": ["dry_run", "version", "changes"],
        "properties": {
            "dry_run": {"type": "boolean"},
            "version": {"type": "integer"},
            "changes": {"type": "array", "items": {"type": "object"}},
        },
    },
}


def docs_page() -> bytes:
    """A page that lists every path, operation and schema of /openapi.json (no CDN, no framework)."""
    return _DOCS


_DOCS = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tollway admin API</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
code,pre{font:12px ui-monospace,monospace}pre{background:#f6f6f6;padding:.6em;overflow:auto}
.op{border:1px solid #ddd;border-radius:4px;margin:.4em 0}.op summary{padding:.4em;cursor:pointer}
.m{display:inline-block;width:5em;font-weight:bold}.get{color:#0a6}.post{color:#06c}.put{color:#a60}
.patch{color:#86a}.delete{color:#c22}
</style></head><body>
<h1>Tollway admin API</h1>
<p>Token (only when the listener requires one): <input id="token" size="50">
<button onclick="load()">load</button> <a href="/openapi.json">/openapi.json</a></p>
<div id="out">loading /openapi.json&hellip;</div>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function pre(o){return '<pre>'+esc(JSON.stringify(o,null,2))+'</pre>'}
async function load(){
  const t=document.getElementById('token').value.trim();
  const r=await fetch('/openapi.json',{headers:t?{Authorization:'Bearer '+t}:{}});
  const out=document.getElementById('out');
  if(!r.ok){out.textContent='GET /openapi.json: '+r.status+' '+(await r.text());return}
  const doc=await r.json();let h='<p>'+esc(doc.info.title)+' '+esc(doc.info.version)+'</p><h2>Paths</h2>';
  for(const [p,item] of Object.entries(doc.paths)){
    for(const [m,op] of Object.entries(item)){ if(m==='parameters')continue;
      h+='<details class="op"><summary><span class="m '+m+'">'+m.toUpperCase()+'</span><code>'+esc(p)+
        '</code> &mdash; '+esc(op.summary||'')+'</summary>'+pre(op)+'</details>'}}
  h+='<h2>Schemas</h2>';
  for(const [n,s] of Object.entries(doc.components.schemas)){
    h+='<details class="op"><summary><code>'+esc(n)+'</code></summary>'+pre(s)+'</details>'}
  out.innerHTML=h}
load();
</script></body></html>
"""
