"""jwt: JSON Web Tokens signed by a consumer's key (HS*, RS*, PS*, ES*, EdDSA).

A token arrives as ``Authorization: Bearer <token>`` (or in configured headers, query parameters or
cookies). The claim named by `key_claim_name` (default `iss`; a header parameter such as `kid` works
too) selects a consumer's credential; the credential says which algorithms it accepts and holds the
key: an HMAC secret, a PEM public key, or a JWKS URL (keys fetched asynchronously, cached, refreshed on
an unknown `kid`; see tollway.plugins.builtin.jwks).

Refused, all with the same 401: `alg: none` and any algorithm the credential does not list (so a token
cannot pick HS256 to have a public key used as an HMAC secret: credentials with a secret accept only
HS*, credentials with a public key or JWKS only the asymmetric family that fits the key), a bad
signature, exp/nbf outside `clock_skew`, a wrong iss or aud, a missing required claim, an exp further
away than `maximum_expiration`, and tokens over `max_token_size`.

A request carrying two different tokens (header and query, two Authorization fields...) is refused: the
gateway will not guess which one the client means.

Verifying costs 30-90 µs, so a verified token's consumer and forwarded headers are cached by
SHA-256(token) — bounded LRU, until the token's exp — and a repeat costs a hash and a dict lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import jwt as pyjwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Field, field_validator, model_validator

from tollway.config.types import Duration, Size
from tollway.plugins.base import HeaderName, Loc, PluginConfig, PluginContext
from tollway.plugins.builtin.auth import AuthConfig, AuthPlugin, query_params
from tollway.plugins.builtin.jwks import JwksSource, source_for
from tollway.plugins.builtin.transform import MANAGED_HEADERS
from tollway.plugins.consumers import Consumer, identify
from tollway.proxy.pdk import header_field

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from tollway.config.schema import GatewayConfig
    from tollway.proxy.pdk import RequestContext, Response

Algorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
TimeClaim = Literal["exp", "nbf"]
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: at least the hash size
_CACHE_CAP = 3600.0  # a verified token without exp (when exp is not required) is re-verified hourly


# -- schemas ------------------------------------------------------------------------------------------
class JwtCredential(PluginConfig):
    key: str = Field(
        min_length=1,
        max_length=1024,
        description="value of the token's `key_claim_name` claim (e.g. its iss) for this credential",
    )
    algorithms: list[Algorithm] = Field(min_length=1, description="algorithms accepted for this credential")
    secret: str | None = Field(None, description="HMAC secret (HS*)")
    secret_base64: bool = Field(False, description="`secret` is base64-encoded")
    public_key: str | None = Field(None, description="PEM public key (RS*, PS*, ES*, EdDSA)")
    jwks_url: str | None = Field(None, description="https URL of a JWKS holding the keys (by kid)")

    @field_validator("jwks_url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http(s) URL")
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError("must be https (http only for a JWKS on this host)")
        return url

    @model_validator(mode="after")
    def _check_key(self) -> JwtCredential:
        given = [n for n in ("secret", "public_key", "jwks_url") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of `secret`, `public_key` or `jwks_url` is required")
        algorithms = set(self.algorithms)
        if self.secret is not None:
            if not algorithms <= HMAC_ALGORITHMS:
                raise ValueError(
                    "a `secret` only signs HS256/HS384/HS512 (anything else invites key confusion)"
                )
            size = len(self.secret_bytes())
            for alg in algorithms:
                if size < _HMAC_MIN_BYTES[alg]:
                    raise ValueError(f"{alg} needs a secret of at least {_HMAC_MIN_BYTES[alg]} bytes")
        elif algorithms & HMAC_ALGORITHMS:
            raise ValueError(
                "HS* algorithms need a `secret`; a public key must never be used as an HMAC secret"
            )
        if self.public_key is not None:
            key = load_public_key(self.public_key)
            for alg in algorithms:
                if not key_fits(alg, key):
                    raise ValueError(f"{alg} does not fit this {type(key).__name__.lstrip('_')}")
        return self

    def secret_bytes(self) -> bytes:
        if self.secret is None:
            return b""
        if not self.secret_base64:
            return self.secret.encode("utf-8")
        try:
            return base64.b64decode(self.secret, validate=True)
        except binascii.Error as exc:
            raise ValueError("secret: not valid base64") from exc

    def identity(self) -> Hashable:
        return self.key


class JwtConfig(AuthConfig):
    header_names: list[HeaderName] = Field(
        default_factory=lambda: ["authorization"],
        description='headers carrying the token ("Bearer <token>" or bare)',
    )
    query_param_names: list[str] = Field(default_factory=list, description="query parameters carrying it")
    cookie_names: list[str] = Field(default_factory=list, description="cookies carrying it")
    key_claim_name: str = Field(
        "iss", min_length=1, description="claim (or header parameter) naming the credential"
    )
    claims_to_verify: list[TimeClaim] = Field(
        ["exp"], description="time claims that must be present (and checked)"
    )
    clock_skew: Duration = Field(30.0, ge=0, le=600, description="leeway for exp and nbf")
    maximum_expiration: Duration = Field(
        0.0, ge=0, description="refuse tokens whose exp is further away; 0 = any"
    )
    issuers: list[str] = Field(default_factory=list, description="accepted iss values; empty = any")
    audiences: list[str] = Field(
        default_factory=list, description="the token's aud must name one; empty = unchecked"
    )
    required_claims: list[str] = Field(default_factory=list, description="claims every token must have")
    forward_claims: dict[str, HeaderName] = Field(
        default_factory=dict, description="claim -> request header sent to the backend"
    )
    max_token_size: Size = Field(8192, ge=64, description="longer tokens are refused unread")
    cache_size: int = Field(10000, ge=0, description="verified tokens remembered per worker")
    jwks_cache_ttl: Duration = Field(300.0, gt=0, description="refresh a JWKS in the background after this")
    jwks_refresh_interval: Duration = Field(
        10.0, ge=0, description="at most one unknown-kid refetch per interval"
    )
    jwks_timeout: Duration = Field(5.0, gt=0, description="a JWKS fetch must finish within this")

    @field_validator("forward_claims")
    @classmethod
    def _headers(cls, claims: dict[str, str]) -> dict[str, str]:
        for header in claims.values():
            if header.lower() in MANAGED_HEADERS or header.lower().startswith("x-consumer-"):
                raise ValueError(f"{header!r} is managed by the gateway and cannot carry a claim")
        return claims


def load_public_key(pem: str) -> Any:
    try:
        return load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError("public_key: not a PEM public key") from exc


def key_fits(alg: str, key: Any) -> bool:
    """Whether an asymmetric key object can verify `alg` (the family, and the curve for ES*)."""
    if alg in RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    if alg in EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == EC_CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


# -- the plugin ---------------------------------------------------------------------------------------
class _Signer:
    """A credential, ready: its consumer, algorithms, and key (or the JWKS source of its keys)."""

    __slots__ = ("algorithms", "consumer", "credential", "jwks", "key")

    def __init__(self, consumer: Consumer, credential: JwtCredential, jwks: JwksSource | None) -> None:
        self.consumer = consumer
        self.credential = credential
        self.algorithms = frozenset(credential.algorithms)
        self.jwks = jwks
        key: Any = None
        if credential.secret is not None:
            key = credential.secret_bytes()
        elif credential.public_key is not None:
            key = load_public_key(credential.public_key)
        self.key = key


# _take_token's answer when a request carries different tokens (compared by identity: never a token).
_MANY_TOKENS = b"<several different tokens>"


class _Invalid(Exception):
    """The token is refused (the client is told nothing more than 401)."""


Verified = tuple[float, Consumer, JwtCredential, list[tuple[bytes, bytes]]]


class JwtAuth(AuthPlugin[JwtConfig]):
    name = "jwt"
    priority = 2600
    consumer_credential = JwtCredential
    scheme = "Bearer"

    def __init__(self, config: JwtConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._signers: dict[str, _Signer] = context.shared(
            ("jwt", "signers", config.jwks_cache_ttl, config.jwks_refresh_interval, config.jwks_timeout),
            lambda: self._index(context),
        )
        self._headers = tuple(h.lower().encode("latin-1") for h in config.header_names)
        self._query = frozenset(config.query_param_names)
        self._cookies = frozenset(config.cookie_names)
        self._forward = [(claim, header) for claim, header in config.forward_claims.items()]
        self._forward_lnames = frozenset(h.lower().encode("latin-1") for h in config.forward_claims.values())
        self._required = [*config.claims_to_verify, *config.required_claims]
        if config.issuers:
            self._required.append("iss")
        if config.audiences:
            self._required.append("aud")
        self._cache: OrderedDict[bytes, Verified] = OrderedDict()
        self._hide = config.hide_credentials

    def _index(self, context: PluginContext) -> dict[str, _Signer]:
        config = self.config
        signers = {}
        for consumer, credential in context.consumers.credentials("jwt", JwtCredential):
            source = None
            if credential.jwks_url is not None:
                source = source_for(
                    credential.jwks_url,
                    config.jwks_cache_ttl,
                    config.jwks_refresh_interval,
                    config.jwks_timeout,
                )
            signers[credential.key] = _Signer(consumer, credential, source)
        return signers

    # -- per request ----------------------------------------------------------------------------------------
    def access(self, ex: RequestContext) -> Response | Awaitable[Response | None] | None:
        if self.anonymous is not None and ex.credential is not None:
            return None
        token = self._take_token(ex)
        if token is _MANY_TOKENS:
            return self.reject(ex, "ambiguous")
        if token is None or len(token) > self.config.max_token_size:
            return self.reject(ex, "missing" if token is None else "invalid")
        digest = hashlib.sha256(token).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[0] > time.time():
                self._cache.move_to_end(digest)
                self._accept(ex, cached)
                return None
            del self._cache[digest]
        try:
            header, claims, signer = self._inspect(token)
        except _Invalid:
            return self.reject(ex)
        if signer.jwks is None:
            return self._verify(ex, token, digest, header, claims, signer, signer.key)
        kid = header.get("kid")
        jwk = signer.jwks.cached(kid if isinstance(kid, str) else None)
        if jwk is not None:
            return self._verify(ex, token, digest, header, claims, signer, jwk.key)
        return self._verify_after_fetch(ex, token, digest, header, claims, signer)

    async def _verify_after_fetch(
        self,
        ex: RequestContext,
        token: bytes,
        digest: bytes,
        header: dict[str, Any],
        claims: dict[str, Any],
        signer: _Signer,
    ) -> Response | None:
        assert signer.jwks is not None
        kid = header.get("kid")
        jwk = await signer.jwks.get(kid if isinstance(kid, str) else None)
        if jwk is None:
            return self.reject(ex)
        return self._verify(ex, token, digest, header, claims, signer, jwk.key)

    def _inspect(self, token: bytes) -> tuple[dict[str, Any], dict[str, Any], _Signer]:
        """Header and claims before verification: enough to pick the credential and refuse early."""
        parts = token.split(b".")
        if len(parts) != 3:
            raise _Invalid
        header, claims = _segment(parts[0]), _segment(parts[1])
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _ALL_ALGORITHMS:
            raise _Invalid  # "none" (any case) and everything unknown
        name = self.config.key_claim_name
        selector = claims.get(name, header.get(name))
        signer = self._signers.get(selector) if isinstance(selector, str) else None
        if signer is None or alg not in signer.algorithms:
            raise _Invalid
        return header, claims, signer

    def _verify(
        self,
        ex: RequestContext,
        token: bytes,
        digest: bytes,
        header: dict[str, Any],
        claims: dict[str, Any],
        signer: _Signer,
        key: Any,
    ) -> Response | None:
        alg = header["alg"]
        if signer.jwks is not None and not key_fits(alg, key):
            return self.reject(ex)  # a JWKS key of another type than the token claims
        config = self.config
        try:
            verified = pyjwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=config.audiences or None,
                issuer=config.issuers or None,
                leeway=config.clock_skew,
                options={"require": self._required, "verify_aud": bool(config.audiences)},
            )
            now = time.time()
            exp = verified.get("exp")
            if config.maximum_expiration and (
                not isinstance(exp, int | float) or exp - now > config.maximum_expiration + config.clock_skew
            ):
                raise _Invalid
            headers = self._forwarded(verified)
        except (pyjwt.InvalidTokenError, _Invalid):
            return self.reject(ex)
        until = (
            min(float(exp) + config.clock_skew, now + _CACHE_CAP)
            if isinstance(exp, int | float)
            else now + _CACHE_CAP
        )
        entry: Verified = (until, signer.consumer, signer.credential, headers)
        if config.cache_size:
            if len(self._cache) >= config.cache_size:
                self._cache.popitem(last=False)
            self._cache[digest] = entry
        self._accept(ex, entry)
        return None

    def _forwarded(self, claims: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        out = []
        for claim, header in self._forward:
            if claim in claims:
                try:
                    out.append(header_field(header, _claim_text(claims[claim])))
                except ValueError as exc:  # CR/LF/NUL in a claim: it would inject headers
                    raise _Invalid from exc
        return out

    def _accept(self, ex: RequestContext, entry: Verified) -> None:
        headers = entry[3]
        if self._forward_lnames:  # the client cannot send what the token is supposed to say
            ex.headers = [h for h in ex.headers if h[0].lower() not in self._forward_lnames]
        identify(ex, entry[1], entry[2])
        if headers:
            ex.headers.extend(headers)

    # -- finding the token ----------------------------------------------------------------------------
    def _take_token(self, ex: RequestContext) -> bytes | None:
        """The token, from every place configured: None if there is none, or if different tokens were
        sent (header and query, two headers...): which one would the client mean? (Kong's rule.)"""
        tokens: list[bytes] = []
        for lname in self._headers:
            for value in self._header_values(ex, lname):
                tokens.append(value[7:].strip() if value[:7].lower() == b"bearer " else value.strip())
        if self._query and ex.query:
            tokens += [value.encode("utf-8") for _, value in query_params(ex, self._query, self._hide)]
        if self._cookies:
            tokens += self._from_cookies(ex)
        if not tokens:
            return None
        token = tokens[0]
        for other in tokens:
            if other != token:
                return _MANY_TOKENS
        return token

    def _header_values(self, ex: RequestContext, lname: bytes) -> list[bytes]:
        values = [value for name, value in ex.headers if name.lower() == lname]
        if values and self._hide:
            ex.headers = [h for h in ex.headers if h[0].lower() != lname]
        return values

    def _from_cookies(self, ex: RequestContext) -> list[bytes]:
        """Tokens in the configured cookies, from every Cookie field; with hide, the other cookies go on
        in one field."""
        fields = [value for name, value in ex.headers if name.lower() == b"cookie"]
        if not fields:
            return []
        found: list[bytes] = []
        kept = []
        for part in b";".join(fields).split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name.decode("latin-1") in self._cookies:
                found.append(value.strip(b'"'))
            elif part.strip():
                kept.append(part.strip())
        if found and self._hide:
            ex.pop_header(b"cookie")
            if kept:
                ex.headers.append((b"Cookie", b"; ".join(kept)))
        return found

    @classmethod
    def check(cls, config: JwtConfig, gateway: GatewayConfig) -> Iterable[tuple[Loc, str]]:
        yield from super().check(config, gateway)
        if not (config.header_names or config.query_param_names or config.cookie_names):
            yield ("header_names",), "the token must be looked for somewhere (headers, query or cookies)"


_ALL_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_CURVES) | {"EdDSA"}


def _segment(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise _Invalid from exc
    if not isinstance(value, dict):
        raise _Invalid
    return value


def _claim_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value)
    return orjson.dumps(value).decode("utf-8")
