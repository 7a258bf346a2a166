"""jwt: every algorithm family with keys generated here, JWKS on 127.0.0.1 with rotation, and attacks."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import jwt as pyjwt
import pytest
from pydantic import ValidationError

from tests.plugins.keys import b64url, ec_key, ed25519_key, jwk, public_pem, rsa_key
from tests.support import Backend, Seen, gateway_config, request, response
from tollway.plugins.builtin.jwt import JwtConfig, JwtCredential

SECRET = "s" * 64  # long enough for HS512


def now() -> int:
    """Read when a token is made, not at import: a worker may reach these tests long after collecting
    them (pytest-xdist), and tokens made to expire in ten minutes must not be stale already."""
    return int(time.time())


def consumers(jwks_url: str | None = None) -> list[dict[str, Any]]:
    found = [
        {
            "username": "hs",
            "credentials": {
                "jwt": [{"key": "hs-issuer", "algorithms": ["HS256", "HS384", "HS512"], "secret": SECRET}]
            },
        },
        {
            "username": "rsa",
            "credentials": {
                "jwt": [
                    {
                        "key": "rsa-issuer",
                        "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
                        "public_key": public_pem(rsa_key()),
                    }
                ]
            },
        },
        {
            "username": "ec",
            "credentials": {
                "jwt": [
                    {"key": "ec256", "algorithms": ["ES256"], "public_key": public_pem(ec_key("P-256"))},
                    {"key": "ec384", "algorithms": ["ES384"], "public_key": public_pem(ec_key("P-384"))},
                    {"key": "ec521", "algorithms": ["ES512"], "public_key": public_pem(ec_key("P-521"))},
                ]
            },
        },
        {
            "username": "ed",
            "credentials": {
                "jwt": [
                    {"key": "ed-issuer", "algorithms": ["EdDSA"], "public_key": public_pem(ed25519_key())}
                ]
            },
        },
        {"username": "guest"},
    ]
    if jwks_url:
        found.append(
            {
                "username": "idp",
                "credentials": {
                    "jwt": [
                        {"key": "https://idp.test", "algorithms": ["RS256", "ES256"], "jwks_url": jwks_url}
                    ]
                },
            }
        )
    return found


def config(jwks_url: str | None = None, **plugin_config: Any) -> dict[str, Any]:
    return {"plugins": [{"name": "jwt", "config": plugin_config}], "consumers": consumers(jwks_url)}


def token(
    iss: str = "hs-issuer", alg: str = "HS256", key: Any = SECRET, headers: dict | None = None, **claims: Any
) -> str:
    payload = {"iss": iss, "sub": "user-1", "exp": now() + 600, **claims}
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def unsigned(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)]
    )


# -- schema -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("credential", "message"),
    [
        ({"key": "k", "algorithms": ["RS256"], "secret": SECRET}, "only signs HS256"),
        ({"key": "k", "algorithms": ["HS256"], "public_key": public_pem(rsa_key())}, "need a `secret`"),
        (
            {"key": "k", "algorithms": ["ES384"], "public_key": public_pem(ec_key("P-256"))},
            "ES384 does not fit",
        ),
        (
            {"key": "k", "algorithms": ["RS256"], "public_key": public_pem(ec_key("P-256"))},
            "RS256 does not fit",
        ),
        ({"key": "k", "algorithms": ["HS256"], "secret": "short"}, "at least 32 bytes"),
        ({"key": "k", "algorithms": ["HS512"], "secret": "s" * 32}, "at least 64 bytes"),
        ({"key": "k", "algorithms": ["RS256"]}, "exactly one of"),
        ({"key": "k", "algorithms": ["RS256"], "public_key": "-----BEGIN nonsense"}, "not a PEM public key"),
        ({"key": "k", "algorithms": ["RS256"], "jwks_url": "http://idp.example.com/jwks"}, "must be https"),
        ({"key": "k", "algorithms": ["none"], "secret": SECRET}, "Input should be"),
        ({"key": "k", "algorithms": [], "secret": SECRET}, "at least 1"),
    ],
)
def test_credential_schema_refuses_confusable_or_weak_keys(credential, message):
    with pytest.raises(ValidationError, match=message):
        JwtCredential.model_validate(credential)


def test_config_schema():
    conf = JwtConfig()
    assert conf.claims_to_verify == ["exp"]
    assert conf.header_names == ["authorization"]
    with pytest.raises(ValidationError, match="managed by the gateway"):
        JwtConfig(forward_claims={"sub": "X-Consumer-Id"})
    with pytest.raises(ValidationError, match="managed by the gateway"):
        JwtConfig(forward_claims={"sub": "Host"})
    with pytest.raises(ValidationError, match="valid header name"):
        JwtConfig(forward_claims={"sub": "X User"})


# -- every algorithm ---------------------------------------------------------------------------------------
ALGORITHMS = [
    ("HS256", "hs-issuer", lambda: SECRET, "hs"),
    ("HS384", "hs-issuer", lambda: SECRET, "hs"),
    ("HS512", "hs-issuer", lambda: SECRET, "hs"),
    ("RS256", "rsa-issuer", rsa_key, "rsa"),
    ("RS384", "rsa-issuer", rsa_key, "rsa"),
    ("RS512", "rsa-issuer", rsa_key, "rsa"),
    ("PS256", "rsa-issuer", rsa_key, "rsa"),
    ("PS384", "rsa-issuer", rsa_key, "rsa"),
    ("PS512", "rsa-issuer", rsa_key, "rsa"),
    ("ES256", "ec256", lambda: ec_key("P-256"), "ec"),
    ("ES384", "ec384", lambda: ec_key("P-384"), "ec"),
    ("ES512", "ec521", lambda: ec_key("P-521"), "ec"),
    ("EdDSA", "ed-issuer", ed25519_key, "ed"),
]


@pytest.mark.parametrize(("alg", "iss", "key", "consumer"), ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_valid_tokens_of_every_algorithm(harness, alg, iss, key, consumer):
    result = harness(config()).request("GET", "/", bearer(token(iss, alg, key())))
    assert result.status == 200, result.response.body
    assert result.upstream.header("x-consumer-username") == consumer
    assert result.upstream.header("authorization") is None


# -- attacks ------------------------------------------------------------------------------------------------
def assert_401(result):
    assert result.status == 401
    assert result.upstream is None
    assert result.header("www-authenticate") == 'Bearer realm="tollway"'
    assert result.json()["message"] == "missing or invalid credentials"  # never which part was wrong


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(harness, alg):
    forged = unsigned({"alg": alg, "typ": "JWT"}, {"iss": "hs-issuer", "exp": now() + 600})
    assert_401(harness(config()).request("GET", "/", bearer(forged)))
    assert_401(harness(config()).request("GET", "/", bearer(forged.rstrip("."))))


def test_rs_to_hs_key_confusion_is_refused(harness):
    # The classic attack: sign HS256 with the RSA *public* key as the HMAC secret.
    pem = public_pem(rsa_key()).encode()
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"iss": "rsa-issuer", "sub": "admin", "exp": now() + 600}).encode())
    import hashlib
    import hmac

    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{b64url(signature)}"
    assert_401(harness(config()).request("GET", "/", bearer(forged)))


def test_algorithm_not_allowed_for_the_credential(harness):
    gw = harness(config())
    assert_401(gw.request("GET", "/", bearer(token("ec256", "ES384", ec_key("P-384")))))
    assert_401(gw.request("GET", "/", bearer(token("hs-issuer", "RS256", rsa_key()))))


def test_expired_and_clock_skew(harness):
    gw = harness(config(clock_skew=30))
    assert_401(gw.request("GET", "/", bearer(token(exp=now() - 120))))
    assert gw.request("GET", "/", bearer(token(exp=int(time.time()) - 10))).status == 200  # within skew
    strict = harness(config(clock_skew=0))
    assert_401(strict.request("GET", "/", bearer(token(exp=int(time.time()) - 10))))


def test_exp_is_required_by_default_and_nbf_when_listed(harness):
    gw = harness(config())
    no_exp = pyjwt.encode({"iss": "hs-issuer"}, SECRET, algorithm="HS256")
    assert_401(gw.request("GET", "/", bearer(no_exp)))
    assert_401(gw.request("GET", "/", bearer(token(nbf=now() + 600))))  # a present nbf is always checked
    nbf = harness(config(claims_to_verify=["exp", "nbf"]))
    assert_401(nbf.request("GET", "/", bearer(token())))  # nbf missing
    assert nbf.request("GET", "/", bearer(token(nbf=now() - 5))).status == 200


def test_audience_and_issuer(harness):
    gw = harness(config(audiences=["orders-api"], issuers=["hs-issuer"]))
    assert_401(gw.request("GET", "/", bearer(token(aud="billing-api"))))
    assert_401(gw.request("GET", "/", bearer(token())))  # no aud at all
    assert gw.request("GET", "/", bearer(token(aud="orders-api"))).status == 200
    assert gw.request("GET", "/", bearer(token(aud=["billing-api", "orders-api"]))).status == 200
    assert_401(gw.request("GET", "/", bearer(token("rsa-issuer", "RS256", rsa_key(), aud="orders-api"))))


def test_required_claims_and_maximum_expiration(harness):
    gw = harness(config(required_claims=["scope"], maximum_expiration=3600))
    assert_401(gw.request("GET", "/", bearer(token())))
    assert gw.request("GET", "/", bearer(token(scope="read"))).status == 200
    assert_401(gw.request("GET", "/", bearer(token(scope="read", exp=now() + 86400))))


def test_tampered_tokens_are_refused(harness):
    gw = harness(config())
    good = token("rsa-issuer", "RS256", rsa_key())
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "admin"
    tampered_payload = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for forged in (
        tampered_payload,
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.",
        "a.b.c",
        "abc",
        good + ".extra",
    ):
        assert_401(gw.request("GET", "/", bearer(forged)))
    assert gw.request("GET", "/", bearer(good)).status == 200


def test_oversized_tokens_are_refused_unread(harness, monkeypatch):
    gw = harness(config(max_token_size=1024))
    decoded = []
    monkeypatch.setattr(pyjwt, "decode", lambda *a, **k: decoded.append(a))
    assert_401(gw.request("GET", "/", bearer(token(padding="x" * 2000))))
    assert decoded == []


def test_unknown_issuer(harness):
    assert_401(harness(config()).request("GET", "/", bearer(token("other-issuer"))))


def test_claims_forwarded_as_headers_and_not_spoofable(harness):
    gw = harness(config(forward_claims={"sub": "X-User-Id", "roles": "X-User-Roles", "org": "X-Org"}))
    result = gw.request(
        "GET", "/", [("X-User-Id", "forged"), *bearer(token(roles=["a", "b"], org={"id": 7})).items()]
    )
    seen = result.upstream
    assert seen.header_all("x-user-id") == ["user-1"]
    assert seen.header("x-user-roles") == "a, b"
    assert seen.header("x-org") == '{"id":7}'


@pytest.mark.parametrize("evil", ["user\r\nX-Admin: true", "user\nX-Admin: true", "user\x00", "a\rb"])
def test_header_injection_through_claims_is_refused(harness, evil):
    gw = harness(config(forward_claims={"sub": "X-User-Id"}))
    assert_401(gw.request("GET", "/", bearer(token(sub=evil))))


def test_verified_tokens_are_cached_until_exp(harness, monkeypatch):
    gw = harness(config(clock_skew=0))
    calls = []
    original = pyjwt.decode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pyjwt, "decode", counting)
    short = token(exp=int(time.time()) + 1)
    for _ in range(3):
        assert gw.request("GET", "/", bearer(short)).status == 200
    assert len(calls) == 1
    time.sleep(
        max(
            0.0,
            pyjwt.decode_complete(short, options={"verify_signature": False})["payload"]["exp"] - time.time(),
        )
        + 0.05
    )
    assert_401(gw.request("GET", "/", bearer(short)))  # the cache never outlives exp


def test_token_in_query_cookie_or_custom_header(harness):
    gw = harness(config(header_names=["x-token"], query_param_names=["jwt"], cookie_names=["session"]))
    t = token()
    bare = gw.request("GET", "/", {"X-Token": t})
    assert bare.status == 200 and bare.upstream.header("x-token") is None
    query = gw.request("GET", f"/p?a=1&jwt={t}")
    assert query.status == 200 and query.upstream.target == "/p?a=1"
    cookie = gw.request("GET", "/", {"Cookie": f"theme=dark; session={t}; lang=en"})
    assert cookie.status == 200
    assert cookie.upstream.header("cookie") == "theme=dark; lang=en"


@pytest.mark.parametrize(
    "where",
    [
        "header and query",
        "two authorization headers",
        "two query parameters",
        "header and cookie",
        "two cookie fields",
    ],
)
def test_two_different_tokens_are_ambiguous(harness, where):
    gw = harness(config(query_param_names=["jwt"], cookie_names=["session"]))
    alice, bob = token(sub="alice"), token(sub="bob")  # both valid on their own
    request = {
        "header and query": (f"/p?jwt={bob}", [("Authorization", f"Bearer {alice}")]),
        "two authorization headers": ("/p", [("Authorization", f"Bearer {alice}"), ("Authorization", bob)]),
        "two query parameters": (f"/p?jwt={alice}&jwt={bob}", []),
        "header and cookie": ("/p", [("Authorization", f"Bearer {alice}"), ("Cookie", f"session={bob}")]),
        "two cookie fields": ("/p", [("Cookie", f"a=1; session={alice}"), ("Cookie", f"session={bob}")]),
    }[where]
    result = gw.request("GET", request[0], request[1])
    assert result.status == 401, where
    assert result.upstream is None
    assert result.header("www-authenticate") == 'Bearer realm="tollway"'


def test_the_same_token_twice_is_one_token(harness):
    gw = harness(config(query_param_names=["jwt"]))
    t = token()
    result = gw.request("GET", f"/p?jwt={t}", bearer(t))
    assert result.status == 200
    assert result.upstream.target == "/p"  # both copies hidden from the backend
    assert result.upstream.header("authorization") is None


def test_anonymous_on_a_bad_token(harness):
    seen = harness(config(anonymous="guest")).request("GET", "/", bearer(token(exp=now() - 3600))).upstream
    assert seen.header("x-consumer-username") == "guest"
    assert seen.header("x-anonymous-consumer") == "true"


# -- JWKS ---------------------------------------------------------------------------------------------------
class JwksServer:
    """A JWKS document on 127.0.0.1, changed by the test (rotation), counting fetches."""

    def __init__(self, loop_thread, backend) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.backend: Backend = backend(self.respond)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.backend.port}/.well-known/jwks.json"

    @property
    def fetches(self) -> int:
        return len(self.backend.seen)

    async def respond(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        body = json.dumps({"keys": self.keys}).encode()
        writer.write(response(self.status, body, [("Content-Type", "application/json")]))
        return True


@pytest.fixture
def jwks(loop_thread, backend) -> JwksServer:
    return JwksServer(loop_thread, backend)


def idp_token(private: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    headers = {"kid": kid} if kid else None
    return token("https://idp.test", alg, private, headers=headers, **claims)


def test_jwks_keys_are_fetched_once_and_cached(harness, jwks):
    jwks.keys = [jwk(rsa_key(0), "k1"), jwk(ec_key("P-256", 1), "k2")]
    gw = harness(config(jwks.url))
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1"))).status == 200
    assert gw.request("GET", "/", bearer(idp_token(ec_key("P-256", 1), "k2", "ES256"))).status == 200
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1", jti="other"))).status == 200
    assert jwks.fetches == 1
    assert (
        gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1"))).upstream.header("x-consumer-username")
        == "idp"
    )


def test_jwks_key_rotation_refetches_on_an_unknown_kid(harness, jwks):
    jwks.keys = [jwk(rsa_key(0), "old")]
    gw = harness(config(jwks.url, jwks_refresh_interval=0))
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "old"))).status == 200
    new_key = rsa_key(1)
    jwks.keys = [jwk(new_key, "new")]  # the provider rotates
    assert gw.request("GET", "/", bearer(idp_token(new_key, "new"))).status == 200
    assert jwks.fetches == 2
    assert_401(gw.request("GET", "/", bearer(idp_token(rsa_key(0), "old", jti="after-rotation"))))


def test_unknown_kids_refetch_at_most_once_per_interval(harness, jwks):
    jwks.keys = [jwk(rsa_key(0), "k1")]
    gw = harness(config(jwks.url, jwks_refresh_interval=60))
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1"))).status == 200
    for i in range(5):
        assert_401(gw.request("GET", "/", bearer(idp_token(rsa_key(0), f"made-up-{i}"))))
    assert jwks.fetches == 1


def test_jwks_outage_keeps_the_last_good_keys(harness, jwks):
    jwks.keys = [jwk(rsa_key(0), "k1")]
    gw = harness(config(jwks.url, jwks_cache_ttl=0.01, jwks_refresh_interval=0))
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1"))).status == 200
    jwks.status = 500
    time.sleep(0.02)
    for i in range(3):  # stale: refreshed in the background, which fails; the known key still works
        assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1", jti=str(i)))).status == 200
    assert gw.wait_for(lambda: jwks.fetches >= 2)  # the background refresh reached the failing server
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1", jti="after"))).status == 200


def test_jwks_cannot_be_used_for_hmac_or_a_mismatched_key_type(harness, jwks):
    jwks.keys = [jwk(rsa_key(0), "k1"), {"kty": "oct", "kid": "sym", "k": b64url(SECRET.encode())}]
    gw = harness(config(jwks.url))
    # HS256 is not among the credential's algorithms: refused before any key is looked at
    assert_401(gw.request("GET", "/", bearer(idp_token(SECRET, "sym", "HS256"))))
    # an ES256 token naming an RSA key's kid
    assert_401(gw.request("GET", "/", bearer(idp_token(ec_key("P-256"), "k1", "ES256"))))
    assert gw.request("GET", "/", bearer(idp_token(rsa_key(0), "k1"))).status == 200


# -- integration ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_jwt_with_jwks_rotation_through_a_real_gateway(gateway, backend, jwks):
    be = backend()
    jwks.keys = [jwk(rsa_key(0), "k1")]
    cfg = gateway_config(be.url)
    cfg["plugins"] = [
        {
            "name": "jwt",
            "config": {"jwks_refresh_interval": 0, "forward_claims": {"sub": "X-User"}, "audiences": ["api"]},
        }
    ]
    cfg["consumers"] = consumers(jwks.url)
    gw = gateway(cfg)
    assert request(gw.port, "GET", "/", headers=bearer(idp_token(rsa_key(0), "k1", aud="api"))).status == 200
    assert be.seen[-1].header("x-user") == "user-1"
    assert request(gw.port, "GET", "/", headers=bearer(idp_token(rsa_key(0), "k1", aud="web"))).status == 401
    jwks.keys = [jwk(rsa_key(1), "k2")]
    assert request(gw.port, "GET", "/", headers=bearer(idp_token(rsa_key(1), "k2", aud="api"))).status == 200
    assert jwks.fetches == 2
    hs = request(gw.port, "GET", "/", headers=bearer(token(aud="api")))
    assert hs.status == 200
    none = unsigned({"alg": "none"}, {"iss": "hs-issuer", "aud": "api", "exp": now() + 60})
    assert request(gw.port, "GET", "/", headers=bearer(none)).status == 401
