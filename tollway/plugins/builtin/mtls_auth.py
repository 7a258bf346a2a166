"""mtls-auth: the client certificate verified during the TLS handshake identifies the consumer.

The listener does the cryptography (an ``mtls`` listener with `gateway.tls.client_auth`: CAs, CRLs);
this plugin only maps the verified certificate to a consumer, by its SHA-256 fingerprint, one of its
subject alternative names, or its subject common name (tried in that order, most specific first). The
maps are built once per config version: a request costs reading the certificate OpenSSL already parsed
(a few µs) and at most three dict lookups. Other plugins read the same identity with
`client_certificate(ex)`, and `forward_header` passes it to the backend (Envoy's XFCC format).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from tollway.plugins.base import HeaderName, PluginConfig, PluginContext
from tollway.plugins.builtin.auth import AuthConfig, AuthPlugin
from tollway.plugins.consumers import Consumer, identify

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext, Response


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The verified client certificate of a request's connection."""

    subject_cn: str | None
    sans: tuple[str, ...]  # every DNS, email and URI name, as written in the certificate
    fingerprint: str  # SHA-256 of the DER certificate, lowercase hex

    def forwarded(self) -> str:
        """Envoy's x-forwarded-client-cert element: Hash=…;Subject="CN=…";DNS=…;URI=…"""
        parts = [f"Hash={self.fingerprint}"]
        if self.subject_cn is not None:
            parts.append('Subject="CN={}"'.format(self.subject_cn.replace('"', "")))
        parts += [f"SAN={san}" for san in self.sans if ";" not in san and "," not in san]
        return ";".join(parts)


def client_certificate(ex: RequestContext) -> ClientCertificate | None:
    """The client certificate OpenSSL verified on this request's connection, or None (clear text, or a
    listener that does not ask for one, or a client that sent none under `mode: request`)."""
    transport = ex.client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    parsed: dict[str, Any] = ssl_object.getpeercert() or {}
    cn = None
    for rdn in parsed.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    sans = tuple(value for kind, value in parsed.get("subjectAltName", ()) if kind in ("DNS", "email", "URI"))
    return ClientCertificate(cn, sans, hashlib.sha256(der).hexdigest())


class MtlsAuthConfig(AuthConfig):
    forward_header: HeaderName | None = Field(
        None,
        description="send the certificate's identity to the backend in this header (e.g. \"X-Forwarded-"
        'Client-Cert"), as Hash=<sha256>;Subject="CN=…";SAN=…; a client-sent one is replaced',
    )


class MtlsCredential(PluginConfig):
    fingerprint: str | None = Field(
        None,
        description="SHA-256 of the certificate (hex; colons and case ignored)",
    )
    san: str | None = Field(None, min_length=1, description="a subject alternative name (DNS, email or URI)")
    subject_cn: str | None = Field(None, min_length=1, description="the subject's common name")

    @field_validator("fingerprint")
    @classmethod
    def _normalize(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalized = value.replace(":", "").lower()
        if len(normalized) != 64 or any(c not in "0123456789abcdef" for c in normalized):
            raise ValueError("must be a SHA-256 in hex (64 digits, colons allowed)")
        return normalized

    @model_validator(mode="after")
    def _one(self) -> MtlsCredential:
        given = [v for v in (self.fingerprint, self.san, self.subject_cn) if v is not None]
        if len(given) != 1:
            raise ValueError("exactly one of fingerprint, san or subject_cn is required")
        return self

    def identity(self) -> Hashable:
        return (self.fingerprint, self.san, self.subject_cn)


Index = dict[str, tuple[Consumer, Any]]


class MtlsAuth(AuthPlugin[MtlsAuthConfig]):
    name = "mtls-auth"
    priority = 2700  # before jwt (2600) and key-auth (2500): a certificate is the stronger credential
    consumer_credential = MtlsCredential

    def __init__(self, config: MtlsAuthConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._indexes: tuple[Index, Index, Index] = context.shared(
            ("mtls-auth", "index"), lambda: _index(context)
        )
        self._forward = config.forward_header

    def access(self, ex: RequestContext) -> Response | None:
        if self.already_authenticated(ex):
            return None
        cert = client_certificate(ex)
        if self._forward is not None:
            ex.remove_header(self._forward)  # never pass on an identity the client wrote itself
        if cert is None:
            return self.reject(ex, "missing")
        by_fingerprint, by_san, by_cn = self._indexes
        found = by_fingerprint.get(cert.fingerprint)
        if found is None:
            for san in cert.sans:
                found = by_san.get(san)
                if found is not None:
                    break
        if found is None and cert.subject_cn is not None:
            found = by_cn.get(cert.subject_cn)
        if found is None:
            return self.reject(ex)
        identify(ex, found[0], found[1])
        if self._forward is not None:
            ex.set_header(self._forward, cert.forwarded())
        return None


def _index(context: PluginContext) -> tuple[Index, Index, Index]:
    by_fingerprint: Index = {}
    by_san: Index = {}
    by_cn: Index = {}
    for consumer, credential in context.consumers.credentials("mtls-auth", MtlsCredential):
        if credential.fingerprint is not None:
            by_fingerprint[credential.fingerprint] = (consumer, credential)
        elif credential.san is not None:
            by_san[credential.san] = (consumer, credential)
        elif credential.subject_cn is not None:
            by_cn[credential.subject_cn] = (consumer, credential)
    return by_fingerprint, by_san, by_cn
