"""The admin API against a real gateway process on a SQLite store: every write is served by the data
plane, ETags guard against lost updates, references are protected, errors have one shape."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.admin.support import AdminClient, start_admin_node
from tests.support import Backend, Gateway, RawClient, request, wait_until

pytestmark = pytest.mark.integration
SERVED = 5.0  # seconds for a write to reach the worker (sqlite data_version watch: ~0.1 s)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Gateway, AdminClient]]:
    gw, admin = start_admin_node(tmp_path / "node.yaml", {"backend": "sqlite", "path": "tollway.db"})
    try:
        yield gw, admin
    finally:
        gw.stop()


def _status(gw: Gateway, path: str, headers: dict[str, str] | None = None) -> int:
    return request(gw.port, path=path, headers=headers).status


def _served(gw: Gateway, path: str, status: int, headers: dict[str, str] | None = None) -> bool:
    return wait_until(lambda: _status(gw, path, headers) == status, SERVED)


def test_crud_of_every_resource_is_served_by_the_data_plane(
    node: tuple[Gateway, AdminClient], backend: Callable[..., Backend]
) -> None:
    gw, admin = node
    b1, b2 = backend(), backend()
    t1, t2 = b1.url.removeprefix("http://"), b2.url.removeprefix("http://")
    # upstream + target, service on it, route under the service
    up = admin.post("/upstreams", {"name": "pool", "targets": [{"target": t1}]})
    assert up.status == 201 and up.body["kind"] == "upstream" and up.header("etag") == '"1"'
    assert admin.post("/services", {"name": "api", "upstream": "pool"}).status == 201
    created = admin.post("/services/api/routes", {"name": "users", "paths": ["/users"]})
    assert created.status == 201 and created.body["data"]["service"] == "api"
    assert _served(gw, "/users", 200)
    assert len(b1.seen) >= 1

    # targets: add the second backend, remove the first: traffic moves to b2 only
    assert admin.post("/upstreams/pool/targets", {"target": t2}).status == 201
    assert admin.delete(f"/upstreams/pool/targets/{t1}").status == 204
    assert [t["target"] for t in admin.get("/upstreams/pool/targets").body["data"]] == [t2]
    health = admin.get("/health").body  # the node's upstream health, as on the status listener
    assert wait_until(lambda: [u["name"] for u in admin.get("/health").body["upstreams"]] == ["pool"], SERVED)
    assert "workers_reporting" in health
    before = len(b2.seen)
    assert _served(gw, "/users", 200) and wait_until(
        lambda: _status(gw, "/users") == 200 and len(b2.seen) > before
    )

    # PATCH (merge patch) moves the route; PUT replaces it whole
    patched = admin.patch("/routes/users", {"paths": ["/people"]})
    assert patched.status == 200 and patched.body["data"]["paths"] == ["/people"]
    assert _served(gw, "/people", 200) and _status(gw, "/users") == 404
    replaced = admin.put("/routes/users", {"service": "api", "paths": ["/v2/users"]})
    assert replaced.status == 200 and replaced.body["data"] == {
        "name": "users",
        "service": "api",
        "paths": ["/v2/users"],
    }
    assert _served(gw, "/v2/users", 200)
    # PUT of a new name creates it (an upsert)
    assert admin.put("/routes/orders", {"service": "api", "paths": ["/orders"]}).status == 201
    assert _served(gw, "/orders", 200)

    # a consumer, a generated key-auth credential, and key-auth as a plugin of the route
    assert admin.post("/consumers", {"username": "ann"}).status == 201
    cred = admin.post("/consumers/ann/credentials/key-auth", {})
    assert cred.status == 201
    key = cred.body["data"]["key"]
    assert len(key) > 20
    plugin = admin.post("/routes/orders/plugins", {"name": "key-auth"})
    assert plugin.status == 201 and plugin.body["data"]["route"] == "orders"
    assert _served(gw, "/orders", 401)
    assert _status(gw, "/orders", {"apikey": key}) == 200
    # the secret is never shown again
    assert admin.get("/consumers/ann").body["data"]["credentials"]["key-auth"][0]["key"] == "<redacted>"
    assert admin.get("/consumers/ann/credentials/key-auth").body["data"][0]["key"] == "<redacted>"
    # a read-modify-write of the redacted consumer keeps the real key
    read = admin.get("/consumers/ann").body["data"]
    assert admin.put("/consumers/ann", {**read, "groups": ["staff"]}).status == 200
    assert wait_until(lambda: _status(gw, "/orders", {"apikey": key}) == 200, SERVED)

    # the plugin by nested path, by its key and by id; then disabled, then deleted
    by_path = admin.get("/routes/orders/plugins/key-auth").body
    assert admin.get(f"/plugins/{by_path['id']}").body["name"] == "key-auth@route=orders"
    assert admin.get("/plugins?route=orders").body["data"][0]["id"] == by_path["id"]
    assert admin.delete("/routes/orders/plugins/key-auth").status == 204
    assert _served(gw, "/orders", 200)

    # a global plugin at /plugins
    assert admin.post("/plugins", {"name": "key-auth"}).status == 201
    assert _served(gw, "/v2/users", 401)
    assert admin.delete("/plugins/key-auth").status == 204
    assert _served(gw, "/v2/users", 200)

    # deletes, children first
    assert admin.delete("/consumers/ann").status == 204
    assert admin.delete("/routes/orders").status == 204
    assert _served(gw, "/orders", 404)
    assert admin.delete("/services/api/routes/users").status == 204
    assert admin.delete("/services/api").status == 204
    assert admin.delete("/upstreams/pool").status == 204
    assert admin.get("/upstreams").body["data"] == []


def test_etags_if_match_and_referenced_deletes(node: tuple[Gateway, AdminClient]) -> None:
    _, admin = node
    svc = admin.post("/services", {"name": "api", "url": "http://127.0.0.1:9"})
    route = admin.post("/routes", {"name": "r", "service": "api", "paths": ["/r"]})
    etag = route.header("etag")
    assert etag == f'"{route.body["version"]}"'
    # a conditional GET
    assert admin.get("/routes/r", headers={"If-None-Match": etag}).status == 304
    # two clients read the same version; the second write is a lost update: 412, nothing changed
    first = admin.patch("/routes/r", {"strip_path": True}, headers={"If-Match": etag})
    assert first.status == 200 and first.header("etag") != etag
    stale = admin.patch("/routes/r", {"priority": 5}, headers={"If-Match": etag})
    assert stale.status == 412 and "version" in stale.body["message"] and stale.body["request_id"]
    assert "priority" not in admin.get("/routes/r").body["data"]
    assert (
        admin.put("/routes/r", {"service": "api", "paths": ["/x"]}, headers={"If-Match": etag}).status == 412
    )
    assert admin.delete("/routes/r", headers={"If-Match": etag}).status == 412
    # If-None-Match: * creates only
    assert (
        admin.put("/routes/r", {"service": "api", "paths": ["/x"]}, headers={"If-None-Match": "*"}).status
        == 412
    )
    # a service a route uses cannot go: 409 naming the route
    refused = admin.delete("/services/api")
    assert refused.status == 409
    assert refused.body["referrers"] == [{"kind": "route", "name": "r", "id": route.body["id"]}]
    assert "route 'r'" in refused.body["message"]
    assert admin.get("/services/api").body["id"] == svc.body["id"]
    # POST of an existing name is a conflict too
    assert admin.post("/services", {"name": "api", "url": "http://127.0.0.1:9"}).status == 409


def test_errors_have_one_shape_and_check_words(node: tuple[Gateway, AdminClient]) -> None:
    _, admin = node
    admin.post("/services", {"name": "api", "url": "http://127.0.0.1:9"})
    bad = admin.post("/routes", {"name": "r", "service": "api", "paths": ["users"], "bogus": 1})
    assert bad.status == 400
    errors = {e["path"]: e for e in bad.body["errors"]}
    assert errors["paths[0]"]["message"].startswith('must start with "/"')
    assert errors["paths[0]"]["entity"] == 'routes "r"'
    assert errors["bogus"]["message"] == "unknown field (check its spelling)"
    assert bad.body["message"].startswith("invalid configuration (2 errors)") and bad.body["request_id"]
    assert admin.get("/routes").body["data"] == []  # nothing written
    dangling = admin.post("/routes", {"name": "r", "service": "nope", "paths": ["/r"]}).body["errors"]
    assert (
        dangling
        == [
            {
                "path": "service",
                "message": "unknown service 'nope'",
                "entity": 'routes "r"',
                "line": "routes[1] \"r\": service: unknown service 'nope'",
            }
        ]
        or dangling[0]["message"] == "unknown service 'nope'"
    )
    plugin = admin.post("/services/api/plugins", {"name": "rate-limiting", "config": {"minute": "x"}})
    assert plugin.status == 400 and plugin.body["errors"][0]["path"].startswith("config.")

    assert admin.get("/routes/nope").status == 404
    assert admin.get("/nothing").status == 404
    assert admin.get("/services/nope/routes").status == 404
    not_allowed = admin.call("POST", "/routes/x")
    assert not_allowed.status == 405 and not_allowed.header("allow") == "GET, HEAD, PUT, PATCH, DELETE"
    assert admin.call("DELETE", "/routes").status == 405
    malformed = admin.post("/routes", raw=b'{"name": ')
    assert malformed.status == 400 and malformed.body["message"].startswith("malformed JSON")
    assert admin.post("/routes", raw=b"[1, 2]").status == 400
    assert admin.post("/routes", raw=b"").status == 400
    assert admin.post("/routes", {"service": "api"}).body["errors"][0]["path"] == "name"
    renamed = admin.put("/routes/a", {"name": "b", "service": "api", "paths": ["/b"]})
    assert renamed.status == 400 and "renaming" in renamed.body["message"]
    # what a web page in the operator's browser could send is refused: no JSON content type (a
    # "simple" cross-site request), or a Host that is not a loopback name (DNS rebinding)
    route = {"name": "csrf", "service": "api", "paths": ["/csrf"]}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        sent = admin.call(
            "POST", "/routes", raw=json.dumps(route).encode(), headers={"Content-Type": ctype or ""}
        )
        assert sent.status == 415, ctype
    assert admin.get("/routes", headers={"Host": "evil.example:8001"}).status == 403
    assert admin.get("/routes", headers={"Host": "localhost:8001"}).status == 200
    assert admin.get("/routes/csrf").status == 404
    # Expect: 100-continue gets its interim answer before the body is sent
    client = RawClient(admin.port)
    try:
        body = b'{"name": "e", "service": "api", "paths": ["/e"]}'
        head = b"POST /routes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        head += b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        client.send(head % len(body))
        assert client.read_response().status == 100
        client.send(body)
        assert client.read_response().status == 201
    finally:
        client.close()
    # a body over max_body (8 MiB): refused as soon as its Content-Length is read, then chunk by chunk
    client = RawClient(admin.port)
    try:
        client.send(b"POST /routes HTTP/1.1\r\nHost: a\r\nContent-Length: 9437184\r\n\r\n{")
        huge = client.read_response()
        assert huge.status == 413 and huge.json()["request_id"]
    finally:
        client.close()
    client = RawClient(admin.port)
    try:
        chunk = b"x" * (1024 * 1024)
        head = b"POST /routes HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        with contextlib.suppress(OSError):  # the server may close while we still send
            client.send(head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)))
        assert client.read_response().status == 413
    finally:
        client.close()
    assert admin.get("/routes?size=0").status == 400
    assert admin.get("/routes?offset=abc").status == 400


def test_list_pagination_filters_and_lookup_by_id(node: tuple[Gateway, AdminClient]) -> None:
    _, admin = node
    admin.post("/services", {"name": "a", "url": "http://127.0.0.1:9", "tags": ["team-x"]})
    admin.post("/services", {"name": "b", "url": "http://127.0.0.1:9"})
    names = [f"r{i:02d}" for i in range(7)]
    for i, name in enumerate(names):
        tags = ["even"] if i % 2 == 0 else []
        admin.post(
            "/routes", {"name": name, "service": "a" if i < 4 else "b", "paths": [f"/{name}"], "tags": tags}
        )
    seen, link, pages = [], "/routes?size=3", 0
    while link:
        page = admin.get(link).body
        seen += [e["name"] for e in page["data"]]
        link, pages = page["next"], pages + 1
    assert seen == names and pages == 3
    assert [e["name"] for e in admin.get("/routes?tags=even").body["data"]] == ["r00", "r02", "r04", "r06"]
    assert [e["name"] for e in admin.get("/routes?service=b").body["data"]] == ["r04", "r05", "r06"]
    assert [e["name"] for e in admin.get("/services/a/routes?tags=even").body["data"]] == ["r00", "r02"]
    assert [e["name"] for e in admin.get("/services?tags=team-x").body["data"]] == ["a"]
    odd = admin.get("/routes?tags=even&size=1").body["next"]
    assert odd == "/routes?tags=even&size=1&offset=" + odd.rsplit("=", 1)[1]
    assert admin.get("/routes?tags=a%26b").body["data"] == []  # an encoded & is part of the tag
    one = admin.get("/routes/r03").body
    assert admin.get(f"/routes/{one['id']}").body == one
    assert admin.get(f"/services/b/routes/{one['name']}").status == 404  # r03 belongs to a


def test_bulk_config_dry_run_apply_and_export_round_trip(
    node: tuple[Gateway, AdminClient], backend: Callable[..., Backend]
) -> None:
    gw, admin = node
    b = backend()
    doc = {
        "services": [{"name": "api", "url": b.url}],
        "routes": [
            {"name": "users", "service": "api", "paths": ["/users"], "plugins": [{"name": "key-auth"}]}
        ],
        "consumers": [{"username": "ann", "credentials": {"key-auth": [{"key": "ann-secret-key"}]}}],
    }
    dry = admin.post("/config?dry_run=true", doc)
    assert dry.status == 200 and dry.body["dry_run"] is True and dry.body["version"] == 0
    assert {(c["action"], c["kind"], c["name"]) for c in dry.body["changes"]} == {
        ("create", "service", "api"),
        ("create", "route", "users"),
        ("create", "consumer", "ann"),
    }
    assert admin.get("/routes").body["data"] == []  # a dry run writes nothing
    applied = admin.post("/config", doc)
    assert applied.status == 200 and applied.body["version"] == 1 and len(applied.body["changes"]) == 3
    assert _served(gw, "/users", 200, {"apikey": "ann-secret-key"})
    # the export redacts the key; applying it back changes nothing and keeps the key working
    exported = admin.get("/config").body
    assert exported["consumers"][0]["credentials"]["key-auth"][0]["key"] == "<redacted>"
    again = admin.post("/config?dry_run=1", {k: v for k, v in exported.items() if k != "version"})
    assert [c for c in again.body["changes"] if c["action"] != "keep"] == []
    assert admin.post("/config", {k: v for k, v in exported.items() if k != "version"}).body["changes"] == []
    # an invalid document: 400 with check's words, for the dry run and the real thing alike
    broken = {"routes": [{"name": "x", "service": "missing", "paths": ["/x"]}]}
    for path in ("/config?dry_run=true", "/config"):
        answer = admin.post(path, broken)
        assert answer.status == 400 and answer.body["errors"][0]["message"] == "unknown service 'missing'"
    # prune: only what the document holds stays
    pruned = admin.post("/config?prune=true&dry_run=true", {"services": doc["services"]})
    assert {(c["action"], c["name"]) for c in pruned.body["changes"]} == {
        ("delete", "users"),
        ("delete", "ann"),
    }
    assert admin.post("/config?prune=true", {"services": doc["services"]}).status == 200
    assert _served(gw, "/users", 404)
    assert (
        admin.post("/config", raw=b"services: []", headers={"Content-Type": "application/yaml"}).status == 200
    )
    assert admin.post("/config", {"servces": []}).status == 400


def test_audit_log_records_every_write_with_secrets_redacted(node: tuple[Gateway, AdminClient]) -> None:
    gw, admin = node
    admin.post("/consumers", {"username": "ann", "credentials": {"key-auth": [{"key": "top-secret-1"}]}})
    admin.patch("/consumers/ann", {"groups": ["staff"]})
    jwt = {"key": "issuer-ann", "algorithms": ["HS256"], "secret": "hunter2-hunter2-hunter2-hunter2-hunter2"}
    assert admin.post("/consumers/ann/credentials/jwt", jwt).status == 201
    # plaintext basic-auth passwords are refused with the plugin's own words
    plain = admin.post("/consumers/ann/credentials/basic-auth", {"username": "ann", "password": "pw"})
    assert (
        plain.status == 400 and "plaintext passwords are not accepted" in plain.body["errors"][0]["message"]
    )
    admin.delete("/consumers/ann")
    log = admin.get("/audit?kind=consumer&name=ann").body["data"]
    assert [e["action"] for e in log] == ["delete", "update", "update", "create"]
    assert all(e["actor"] == "anonymous@127.0.0.1" and e["address"] == "127.0.0.1" for e in log)
    assert all(e["request_id"] for e in log)
    # the same writes as structured lines on the access log's sink (stdout here)
    lines = [json.loads(line)["audit"] for line in gw.output if line.startswith('{"audit"')]
    assert [c["action"] for line in lines for c in line["changes"]] == [
        "create",
        "update",
        "update",
        "delete",
    ]
    assert {line["request_id"] for line in lines} == {e["request_id"] for e in log}
    text = str(log)
    assert "top-secret-1" not in text and "hunter2" not in text
    assert log[-1]["before"] is None and log[-1]["after"]["credentials"]["key-auth"][0]["key"] == "<redacted>"
    assert log[0]["after"] is None and log[0]["before"]["groups"] == ["staff"]
    assert "groups" not in log[2]["before"]
    assert log[2]["after"]["groups"] == ["staff"]
    assert log[1]["after"]["credentials"]["jwt"][0]["secret"] == "<redacted>"
    assert log[1]["after"]["credentials"]["jwt"][0]["key"] == "issuer-ann"  # an issuer, not a secret
    page = admin.get("/audit?size=2").body
    assert len(page["data"]) == 2 and page["next"]
    assert len(admin.get(page["next"]).body["data"]) == 2
    assert admin.get("/audit?kind=bogus").status == 400


def test_a_redacted_secret_is_never_moved_to_another_credential(node: tuple[Gateway, AdminClient]) -> None:
    gw, admin = node
    keys = [{"key": "first-key-aaaa"}, {"key": "second-key-bbbb"}]
    admin.post("/services", {"name": "api", "url": "http://127.0.0.1:9"})
    admin.post("/consumers", {"username": "ann", "credentials": {"key-auth": keys}})
    read = admin.get("/consumers/ann").body["data"]
    assert read["credentials"]["key-auth"] == [{"key": "<redacted>"}, {"key": "<redacted>"}]
    # dropping the first redacted item: which secret the remaining placeholder means is ambiguous
    dropped = {**read, "credentials": {"key-auth": read["credentials"]["key-auth"][1:]}}
    refused = admin.put("/consumers/ann", dropped)
    assert refused.status == 400 and "stands for a stored secret" in refused.body["message"]
    assert admin.patch("/consumers/ann", {"credentials": {"key-auth": [{"key": "<redacted>"}]}}).status == 400
    # the way to remove one: its own path; the other key is kept as it was
    assert admin.delete("/consumers/ann/credentials/key-auth/0").status == 204
    admin.post("/routes", {"name": "r", "service": "api", "paths": ["/r"], "plugins": [{"name": "key-auth"}]})
    assert wait_until(lambda: request(gw.port, path="/r", headers={"apikey": "first-key-aaaa"}).status == 401)
    assert request(gw.port, path="/r", headers={"apikey": "second-key-bbbb"}).status == 502
    # same-shape read-modify-write keeps each secret in its place
    same = admin.get("/consumers/ann").body["data"]
    assert admin.put("/consumers/ann", {**same, "groups": ["x"]}).status == 200
    assert request(gw.port, path="/r", headers={"apikey": "second-key-bbbb"}).status == 502


def test_openapi_document_and_its_page(node: tuple[Gateway, AdminClient]) -> None:
    _, admin = node
    doc = admin.get("/openapi.json").body
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    # generated from the config's own models: the route's fields and their descriptions are there
    assert {"name", "service", "paths", "tags", "strip_path"} <= set(schemas["Route"]["properties"])
    assert schemas["Route"]["properties"]["strip_path"]["description"].startswith("remove the matched path")
    assert {"Upstream", "Service", "Consumer", "PluginInstance", "Target", "Error", "Entity"} <= set(schemas)
    post = doc["paths"]["/services/{parent}/routes"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Route"
    }
    page = admin.get("/docs")
    assert page.status == 200 and page.header("content-type").startswith("text/html")
    html = page.raw.decode()
    assert (
        "/openapi.json" in html and "https://" not in html and "http://" not in html
    )  # nothing fetched elsewhere
