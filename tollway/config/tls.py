"""The TLS part of the configuration schema (docs/tls.md): listener policy, certificates, client
certificates (mutual TLS) and TLS to backends.

Kept apart from ``schema.py`` so the TLS entities read together; ``schema.py`` imports them into the
entities that use them (``gateway.tls``, ``certificates``, ``services[].tls``, ``upstreams[].tls``).
Like the rest of the schema, these models are validated once per config load; `check_tls` adds what a
model cannot know alone (files that exist and parse, keys that match, names that are referenced).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from tollway.config.types import Duration, Name, parse_listen

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig

Loc = tuple[str | int, ...]

# OpenSSL cipher string for TLS 1.2: forward secrecy and AEAD only (Mozilla's "intermediate" list).
# TLS 1.3 suites are OpenSSL's defaults (all AEAD: AES-GCM and ChaCha20-Poly1305).
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_SNI_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_SNI = re.compile(rf"^(\*\.)?({_SNI_LABEL}\.)*{_SNI_LABEL}$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _check_sni(name: str) -> str:
    name = name.lower().rstrip(".")
    if not _SNI.match(name):
        raise ValueError('must be a host name or a wildcard like "*.example.com"')
    return name


SniName = Annotated[str, AfterValidator(_check_sni)]


class ClientAuth(Model):
    """Client certificates (mutual TLS) on listeners marked ``mtls`` (``"0.0.0.0:8443 tls mtls"``)."""

    mode: Literal["request", "require"] = Field(
        "require",
        description="require: a handshake without a valid client certificate fails; request: a client may "
        "send none (plugins see no identity), but a certificate it sends must be valid",
    )
    ca_file: str | None = Field(
        None,
        description="PEM file of the CAs that sign client certificates; null: only the names whose "
        "certificate has its own client_auth accept client certificates",
    )
    crl_files: list[str] = Field(
        default_factory=list, description="PEM CRL files; a revoked client certificate fails the handshake"
    )


Alpn = Literal["http/1.1"]


def _default_alpn() -> list[Alpn]:
    return ["http/1.1"]


class ClientCas(Model):
    """The CAs (and CRLs) that verify client certificates for one certificate's names (per SNI)."""

    ca_file: str = Field(description="PEM file of the CAs that sign client certificates for these names")
    crl_files: list[str] = Field(default_factory=list, description="PEM CRL files")


class ListenerTls(Model):
    """How TLS listeners (``listen`` entries ending in ``tls``) talk TLS. Protocol settings apply at start;
    certificates reload live."""

    min_version: Literal["1.2", "1.3"] = Field("1.2", description="oldest protocol accepted (1.0/1.1 never)")
    ciphers: str = Field(
        DEFAULT_CIPHERS, min_length=1, description="OpenSSL cipher list for TLS 1.2 (1.3 suites are fixed)"
    )
    default_certificate: str | None = Field(
        None, description="certificate for clients without SNI or with an unknown name; null = the first"
    )
    unknown_sni: Literal["default", "refuse"] = Field(
        "default",
        description="a client naming a host no certificate covers gets the default certificate, or is "
        "refused (handshake alert unrecognized_name); clients without SNI always get the default",
    )
    handshake_timeout: Duration = Field(
        10.0, gt=0, description="a client that has not finished its handshake by then is disconnected"
    )
    session_tickets: bool = Field(True, description="TLS session resumption with tickets")
    ticket_key_rotation: Duration = Field(
        43200.0,
        ge=60,
        description="session-ticket keys, shared by the workers, are replaced this often (tickets "
        "issued before then need one full handshake)",
    )
    alpn: list[Alpn] = Field(
        default_factory=_default_alpn, description="ALPN protocols offered (http/1.1 today)"
    )
    client_auth: ClientAuth | None = Field(None, description="client certificates on listeners marked mtls")


class Certificate(Model):
    """A certificate (with its chain) and its key, served to clients naming one of `snis`."""

    name: Name = Field(description="unique; `gateway.tls.default_certificate` and metrics refer to it")
    cert: str = Field(description="PEM file path (the certificate, then its chain), or the PEM text itself")
    key: str = Field(description="PEM private key file path, or the PEM text itself")
    cert_alt: str | None = Field(
        None,
        description="a second certificate of the other key type (ECDSA beside RSA, or RSA beside ECDSA), "
        "served to clients that cannot use the first",
    )
    key_alt: str | None = Field(None, description="the key of cert_alt")
    passphrase_file: str | None = Field(None, description="file holding the passphrase of an encrypted key")
    passphrase_env: str | None = Field(
        None, description="environment variable holding the passphrase of an encrypted key"
    )
    snis: list[SniName] = Field(
        default_factory=list,
        description='names this certificate serves: "api.example.com" or "*.example.com" (one label)',
    )
    client_auth: ClientCas | None = Field(
        None,
        description="on mtls listeners, verify client certificates for these names against these CAs "
        "instead of gateway.tls.client_auth's (the listener's mode still applies)",
    )

    @model_validator(mode="after")
    def _one_passphrase(self) -> Certificate:
        if self.passphrase_file is not None and self.passphrase_env is not None:
            raise ValueError("at most one of passphrase_file or passphrase_env")
        if (self.cert_alt is None) != (self.key_alt is None):
            raise ValueError("cert_alt and key_alt go together")
        return self

    def passphrase(self) -> bytes | None:
        """The key's passphrase, read now (files and variables may change between reloads)."""
        if self.passphrase_file is not None:
            with open(self.passphrase_file, "rb") as f:
                return f.read().rstrip(b"\r\n")
        if self.passphrase_env is not None:
            value = os.environ.get(self.passphrase_env)
            if value is None:
                raise ValueError(f"environment variable {self.passphrase_env} is not set")
            return value.encode()
        return None


class UpstreamTls(Model):
    """TLS to the backends of an https:// service or an upstream with `scheme: https`."""

    verify: bool = Field(
        True, description="verify the backend's certificate and name (false: logged as a warning at load)"
    )
    ca_file: str | None = Field(None, description="PEM CA bundle to verify against; null = system CAs")
    server_name: str | None = Field(
        None, description="SNI name sent and verified (default: the service URL's host / the target's host)"
    )
    client_cert: str | None = Field(None, description="PEM certificate (and chain) presented to the backend")
    client_key: str | None = Field(None, description="PEM key of client_cert")

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


# -- checks that need files or several entities ---------------------------------------------------------
def check_tls(config: GatewayConfig) -> Iterator[tuple[Loc, str]]:
    """Unique names, references, and files that load (certificates with their keys, CAs, CRLs)."""
    names: set[str] = set()
    for i, cert in enumerate(config.certificates):
        if cert.name in names:
            yield ("certificates", i, "name"), f"duplicate name {cert.name!r}"
        names.add(cert.name)
        problem = load_problem(cert)
        if problem:
            yield ("certificates", i), problem
    tls = config.gateway.tls
    if tls.default_certificate is not None and tls.default_certificate not in names:
        yield ("gateway", "tls", "default_certificate"), f"unknown certificate {tls.default_certificate!r}"
    flags = [parse_listen(a)[2] for a in config.gateway.listen]
    if any("tls" in f for f in flags) and not config.certificates:
        yield ("gateway", "listen"), "a tls listener needs at least one entry in `certificates`"
    if any("mtls" in f for f in flags) and tls.client_auth is None:
        yield ("gateway", "listen"), "an mtls listener needs gateway.tls.client_auth"
    places: list[tuple[Loc, ClientAuth | ClientCas | None]] = [
        (("gateway", "tls", "client_auth"), tls.client_auth)
    ]
    places += [
        (("certificates", i, "client_auth"), cert.client_auth) for i, cert in enumerate(config.certificates)
    ]
    with_crls = [where for where, auth in places if auth is not None and auth.crl_files]
    for where, auth in places:
        if auth is None:
            continue
        if with_crls and not auth.crl_files and auth.ca_file is not None:
            # OpenSSL checks CRLs for every name of a listener or for none: a CA without a CRL would
            # make each of its certificates fail ("unable to get certificate CRL").
            first = ".".join(str(part) for part in with_crls[0])
            yield (*where, "crl_files"), f"CRLs are checked (crl_files in {first}): give this CA's CRL too"
        files: list[tuple[Loc, str]] = [(("ca_file",), auth.ca_file)] if auth.ca_file is not None else []
        files += [(("crl_files", j), p) for j, p in enumerate(auth.crl_files)]
        for loc, path in files:
            if not is_pem_text(path) and not os.path.isfile(path):
                yield (*where, *loc), f"{path}: no such file"


def is_pem_text(value: str) -> bool:
    return value.lstrip().startswith("-----BEGIN")


@contextlib.contextmanager
def pem_path(value: str) -> Iterator[str]:
    """A file path for a PEM value: the path itself, or (for PEM text, as the config store holds it) a
    private temporary file that exists only while the caller loads it (OpenSSL loads keys from files)."""
    if not is_pem_text(value):
        yield value
        return
    fd, path = tempfile.mkstemp(prefix="tollway-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value)
        yield path
    finally:
        os.unlink(path)


def load_chain(context: ssl.SSLContext, cert: Certificate) -> None:
    """Load a certificate entity's chain and key into `context` (OSError, ssl.SSLError, ValueError)."""
    passphrase = cert.passphrase()
    pairs = [(cert.cert, cert.key)]
    if cert.cert_alt is not None and cert.key_alt is not None:
        # OpenSSL keeps one certificate per key type in a context and serves the one the client's
        # signature algorithms allow: RSA and ECDSA side by side for the same names.
        pairs.append((cert.cert_alt, cert.key_alt))
    for chain, key in pairs:
        with pem_path(chain) as cert_file, pem_path(key) as key_file:
            # A callable for the password: an encrypted key without one fails instead of prompting.
            context.load_cert_chain(cert_file, key_file, password=lambda: passphrase or b"")


def load_problem(cert: Certificate) -> str | None:
    """Why a certificate entity cannot be served, or None."""
    for field in ("cert", "key", "cert_alt", "key_alt"):
        value = getattr(cert, field)
        if value is not None and not is_pem_text(value) and not os.path.isfile(value):
            return f"{field}: {value}: no such file"
    try:
        load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return f"cannot load certificate and key: {reason} (wrong key, passphrase, or not PEM?)"
    return None


# -- expiry and warnings (`tollway check`, the supervisor at load, the expiry metric) ---------------------
EXPIRY_WARNING_DAYS = 30


def _read_pem(value: str) -> bytes:
    if is_pem_text(value):
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


def certificate_expiry(cert: Certificate) -> float | None:
    """When the certificate (the first of its file: the leaf) expires, as a UNIX time; None if unreadable."""
    from cryptography import x509  # a dependency; imported here so loading a config without TLS skips it

    try:
        leaf = x509.load_pem_x509_certificate(_read_pem(cert.cert))
    except (OSError, ValueError):
        return None
    return leaf.not_valid_after_utc.timestamp()


def tls_warnings(config: GatewayConfig, now: float | None = None) -> list[str]:
    """What is valid but deserves attention: certificates expired or expiring within 30 days, backends
    whose certificates are not verified."""
    import time

    now = time.time() if now is None else now
    warnings = []
    for cert in config.certificates:
        expiry = certificate_expiry(cert)
        if expiry is None:
            continue
        days = (expiry - now) / 86400
        if days < 0:
            warnings.append(f"certificate {cert.name!r} expired {-days:.0f} days ago")
        elif days < EXPIRY_WARNING_DAYS:
            warnings.append(f"certificate {cert.name!r} expires in {days:.0f} days")
    for kind in ("services", "upstreams"):
        for entity in getattr(config, kind):
            uses_tls = entity.url.startswith("https:") if kind == "services" and entity.url else False
            uses_tls = uses_tls or getattr(entity, "scheme", "http") == "https"
            if uses_tls and not entity.tls.verify:
                warnings.append(
                    f"{kind[:-1]} {entity.name!r}: tls.verify is false, the backend's certificate is not "
                    "checked (anyone on the path can impersonate it)"
                )
    return warnings
