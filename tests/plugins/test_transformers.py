"""request-transformer and response-transformer: schema (incl. header injection), handler, integration."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from pydantic import ValidationError

from tests.support import RawClient, gateway_config, request, response
from tollway.plugins.builtin.request_transformer import RequestTransformerConfig
from tollway.plugins.builtin.response_transformer import ResponseTransformerConfig

JSON = {"Content-Type": "application/json"}


def req(**conf) -> dict:
    return {"plugins": [{"name": "request-transformer", "config": conf}]}


def resp(**conf) -> dict:
    return {"plugins": [{"name": "response-transformer", "config": conf}]}


# -- schema: nothing from a config can inject a header ----------------------------------------------------
@pytest.mark.parametrize(
    "conf",
    [
        {"add": {"headers": {"X-A": "ok\r\nX-Injected: 1"}}},
        {"add": {"headers": {"X-A": "ok\nX-Injected: 1"}}},
        {"replace": {"headers": {"X-A": "nul\x00"}}},
        {"append": {"headers": {"X-A": "bell\x07"}}},
        {"add": {"headers": {"X-A\r\nX-B": "v"}}},
        {"add": {"headers": {"X A": "v"}}},
        {"rename": {"headers": {"x-a": "x-b\r\n"}}},
        {"remove": {"headers": ["x\nb"]}},
    ],
)
def test_header_injection_through_transformer_values_is_refused_at_load(conf):
    with pytest.raises(ValidationError):
        RequestTransformerConfig.model_validate(conf)
    with pytest.raises(ValidationError):
        ResponseTransformerConfig.model_validate(conf)


@pytest.mark.parametrize(
    "name", ["Host", "Content-Length", "transfer-encoding", "Connection", "X-Forwarded-For", "X-Request-Id"]
)
def test_gateway_managed_headers_cannot_be_edited(name):
    with pytest.raises(ValidationError, match="managed by the gateway"):
        RequestTransformerConfig.model_validate({"add": {"headers": {name: "x"}}})
    with pytest.raises(ValidationError, match="managed by the gateway"):
        RequestTransformerConfig.model_validate({"rename": {"headers": {"x-a": name}}})


def test_response_transformer_has_no_query_string():
    with pytest.raises(ValidationError, match="no query string"):
        ResponseTransformerConfig.model_validate({"add": {"querystring": {"a": "b"}}})


# -- request-transformer -------------------------------------------------------------------------------------
def test_request_header_operations_in_order(harness):
    gw = harness(
        req(
            remove={"headers": ["x-remove"]},
            rename={"headers": {"x-old": "X-New"}},
            replace={"headers": {"X-Replace": "replaced", "X-Absent": "never"}},
            add={"headers": {"X-Add": "added", "X-Exists": "not-added"}},
            append={"headers": {"X-Exists": "appended"}},
        )
    )
    seen = gw.request(
        "GET",
        "/",
        [("X-Remove", "1"), ("X-Old", "v"), ("X-Replace", "a"), ("X-Replace", "b"), ("X-Exists", "mine")],
    ).upstream
    assert seen.header("x-remove") is None
    assert seen.header("x-old") is None and seen.header("x-new") == "v"
    assert seen.header_all("x-replace") == ["replaced"]
    assert seen.header("x-absent") is None
    assert seen.header("x-add") == "added"
    assert seen.header_all("x-exists") == ["mine", "appended"]


def test_a_rename_onto_an_existing_header_replaces_it(harness):
    gw = harness(req(rename={"headers": {"x-user-v1": "X-User", "x-a": "x-b", "x-b": "x-c"}}))
    seen = gw.request(
        "GET", "/", [("X-User", "forged"), ("X-User-V1", "alice"), ("X-B", "b"), ("X-A", "a"), ("X-C", "c")]
    ).upstream
    assert seen.header_all("x-user") == ["alice"]  # one value: the renamed header's
    assert seen.header("x-user-v1") is None
    assert seen.header_all("x-b") == ["a"] and seen.header_all("x-c") == ["b"]  # renames do not chain
    untouched = gw.request("GET", "/", [("X-User", "mine")]).upstream
    assert untouched.header_all("x-user") == ["mine"]  # nothing to rename: nothing replaced


def test_request_query_operations_are_encoded(harness):
    gw = harness(
        req(
            remove={"querystring": ["secret"]},
            rename={"querystring": {"q": "query"}},
            replace={"querystring": {"page": "1"}},
            add={"querystring": {"lang": "en", "page": "99"}},
            append={"querystring": {"tag": "a b&c=d #x\r\n"}},
        )
    )
    seen = gw.request("GET", "/search?q=x&secret=s&page=5").upstream
    assert seen.target == "/search?query=x&page=1&lang=en&tag=a%20b%26c%3Dd%20%23x%0D%0A"


def test_request_json_body_operations(harness):
    gw = harness(
        req(
            remove={"body": ["password"]},
            rename={"body": {"user": "username"}},
            replace={"body": {"role": "user"}},
            add={"body": {"source": "gateway", "role": "never"}},
            append={"body": {"tags": "gw"}},
        )
    )
    body = json.dumps({"user": "ann", "password": "x", "role": "admin", "tags": ["a"]}).encode()
    seen = gw.request("POST", "/", JSON, body=body).upstream
    assert json.loads(seen.body) == {
        "username": "ann",
        "role": "user",
        "tags": ["a", "gw"],
        "source": "gateway",
    }
    assert int(seen.header("content-length")) == len(seen.body)


def test_request_bodies_not_transformed_pass_through_untouched(harness):
    gw = harness(req(add={"body": {"x": 1}}, max_body_size=64))
    cases = [
        (JSON, b'{"big": "' + b"y" * 100 + b'"}'),  # over max_body_size
        ({"Content-Type": "text/plain"}, b'{"a": 1}'),  # not JSON
        (JSON, b"[1, 2]"),  # not an object
        (JSON, b"{not json"),
        ({**JSON, "Content-Encoding": "gzip"}, b'{"a": 1}'),
    ]
    for headers, body in cases:
        seen = gw.request("POST", "/", headers, body=body).upstream
        assert seen.body == body, headers
    chunked = gw.request(
        raw=b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n8\r\n{"a": 1}\r\n0\r\n\r\n'
    ).upstream
    assert chunked.body == b'{"a": 1}'


def test_request_body_transform_of_a_larger_body(harness):
    gw = harness(req(add={"body": {"added": True}}))
    body = json.dumps({"a": "x" * 1000}).encode()
    head = (
        f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    seen = gw.request(raw=head.encode() + body).upstream  # all at once
    assert json.loads(seen.body)["added"] is True


# -- response-transformer ---------------------------------------------------------------------------------
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_request_form_body_operations(harness):
    gw = harness(
        req(
            remove={"body": ["password"]},
            rename={"body": {"user": "username"}},
            replace={"body": {"channel": "api", "absent": "never"}},
            add={"body": {"source": "gateway", "n": 3, "channel": "not-added"}},
            append={"body": {"tag": "café"}},
        )
    )
    body = b"user=ann&username=forged&password=s3cret&channel=web&channel=app&tag=a+b&note=caf%E9"
    seen = gw.request("POST", "/", FORM, body=body).upstream
    assert parse_qsl(seen.body.decode(), keep_blank_values=True, encoding="latin-1") == [
        ("username", "ann"),  # the rename replaced the client's own "username"
        ("channel", "api"),  # all fields of the name become one
        ("tag", "a b"),
        ("note", "caf\xe9"),  # a latin-1 byte from the client passes unchanged
        ("source", "gateway"),
        ("n", "3"),
        ("tag", "caf\xc3\xa9"),  # the config's text, as UTF-8
    ]
    assert seen.header("content-length") == str(len(seen.body))
    charset = gw.request(
        "POST", "/", {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, body=b"x=1"
    )
    assert parse_qsl(charset.upstream.body.decode()) == [
        ("x", "1"),
        ("source", "gateway"),
        ("n", "3"),
        ("channel", "not-added"),  # absent here: added
        ("tag", "café"),
    ]
    text = gw.request("POST", "/", {"Content-Type": "text/plain"}, body=b"password=1")
    assert text.upstream.body == b"password=1"  # not a form: untouched


def test_request_method_change(harness):
    gw = harness(req(http_method="post"))
    seen = gw.request("GET", "/x?a=1").upstream
    assert seen.start == "POST /x?a=1 HTTP/1.1"
    assert gw.request("PUT", "/x", JSON, body=b"{}").upstream.start.startswith("POST /x ")
    head = gw.request("HEAD", "/x", backend=(200, [("Content-Length", "0")], b"")).upstream
    assert head.start.startswith("HEAD /x ")  # a HEAD answer has no body: HEAD stays HEAD
    for bad in ("HEAD", "CONNECT", "GET /", ""):
        with pytest.raises(ValidationError):
            RequestTransformerConfig(http_method=bad)


def backend_json(data, headers=()) -> tuple:
    return 200, [("Content-Type", "application/json"), *headers], json.dumps(data).encode()


def test_response_header_operations(harness):
    gw = harness(
        resp(
            remove={"headers": ["server"]},
            add={"headers": {"X-Gateway": "tollway"}},
            rename={"headers": {"x-internal": "X-Public"}},
        )
    )
    result = gw.request("GET", "/", backend=backend_json({}, [("Server", "secret/1.0"), ("X-Internal", "v")]))
    assert result.header("server") is None
    assert result.header("x-gateway") == "tollway"
    assert result.header("x-public") == "v"


def test_response_rename_onto_an_existing_header_replaces_it(harness):
    gw = harness(resp(rename={"headers": {"x-backend-cache": "Cache-Control"}}))
    backend = backend_json({}, [("Cache-Control", "no-store"), ("X-Backend-Cache", "max-age=60")])
    result = gw.request("GET", "/", backend=backend)
    assert result.response.header_all("cache-control") == ["max-age=60"]


def test_response_json_body_operations(harness):
    gw = harness(resp(remove={"body": ["internal_id"]}, add={"body": {"version": 2}}))
    result = gw.request("GET", "/", backend=backend_json({"id": 1, "internal_id": 99}))
    assert result.json() == {"id": 1, "version": 2}
    assert int(result.header("content-length")) == len(result.response.body)


def test_response_bodies_not_transformed_pass_through(harness):
    gw = harness(resp(add={"body": {"x": 1}}, max_body_size=32))
    big = backend_json({"long": "z" * 100})
    assert gw.request("GET", "/", backend=big).response.body == big[2]
    text = (200, [("Content-Type", "text/plain")], b'{"a": 1}')
    assert gw.request("GET", "/", backend=text).response.body == b'{"a": 1}'
    chunked = (
        200,
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        b'8\r\n{"a": 1}\r\n0\r\n\r\n',
    )
    assert gw.request("GET", "/", backend=chunked).response.body == b'{"a": 1}'
    assert (
        gw.request(
            "HEAD", "/", backend=(200, [("Content-Type", "application/json"), ("Content-Length", "8")], b"")
        ).status
        == 200
    )


def test_both_transformers_and_a_user_body_transform_compose(harness):
    gw = harness(
        {
            "plugins": [
                {"name": "request-transformer", "config": {"add": {"body": {"a": 1}}}},
                {"name": "tests.plugins.test_transformers:AddB", "config": {}},
            ]
        }
    )
    seen = gw.request("POST", "/", JSON, body=b"{}").upstream
    assert json.loads(seen.body) == {"a": 1, "b": 2}


from tollway.plugins import Exchange, Plugin, PluginConfig  # noqa: E402


class _Empty(PluginConfig):
    pass


class AddB(Plugin[_Empty]):
    name = "add-b"
    priority = 700

    def access(self, ex: Exchange) -> None:
        ex.buffer_request_body(lambda body: json.dumps({**json.loads(body), "b": 2}).encode(), 1024)


# -- integration ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_transformers_through_a_real_gateway(gateway, backend):
    async def json_backend(seen, writer):
        data = {"echo": json.loads(seen.body or b"{}"), "internal": True}
        writer.write(
            response(
                200,
                json.dumps(data).encode(),
                [("Content-Type", "application/json"), ("X-Powered-By", "php")],
            )
        )
        return True

    be = backend(json_backend)
    cfg = gateway_config(be.url)
    cfg["plugins"] = [
        {
            "name": "request-transformer",
            "config": {
                "add": {"headers": {"X-From": "gw"}, "body": {"via": "gw"}},
                "remove": {"querystring": ["debug"]},
            },
        },
        {
            "name": "response-transformer",
            "config": {"remove": {"headers": ["x-powered-by"], "body": ["internal"]}},
        },
    ]
    gw = gateway(cfg)
    client = RawClient(gw.port)
    body = b'{"n": 1}'
    # Expect: 100-continue with a body the gateway must buffer: it says 100 itself, then reads the body
    client.send(
        b"POST /x?debug=1&a=2 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = client.read_response()
    assert interim.status == 100
    client.send(body)
    result = client.read_response()
    client.close()
    assert result.status == 200
    assert result.json() == {"echo": {"n": 1, "via": "gw"}}
    assert result.header("x-powered-by") is None
    seen = be.seen[-1]
    assert seen.target == "/x?a=2"
    assert seen.header("x-from") == "gw"
    plain = request(gw.port, "GET", "/y")
    assert plain.json() == {"echo": {}}


@pytest.mark.integration
def test_method_form_body_and_header_rename_through_a_real_gateway(gateway, backend):
    be = backend()
    cfg = gateway_config(be.url)
    cfg["plugins"] = [
        {
            "name": "request-transformer",
            "config": {
                "http_method": "PUT",
                "rename": {"headers": {"x-user-v1": "X-User"}, "body": {"pw": "password"}},
                "add": {"body": {"via": "gw"}},
            },
        }
    ]
    gw = gateway(cfg)
    result = request(
        gw.port,
        "POST",
        "/form",
        {**FORM, "X-User": "forged", "X-User-V1": "alice"},
        b"name=a+b&pw=x%26y",
    )
    assert result.status == 200
    seen = be.seen[-1]
    assert seen.method == "PUT"
    assert seen.header_all("x-user") == ["alice"]
    assert seen.header("x-user-v1") is None
    assert parse_qsl(seen.body.decode()) == [("name", "a b"), ("password", "x&y"), ("via", "gw")]
    assert seen.header("content-length") == str(len(seen.body))
