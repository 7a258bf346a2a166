"""Server-side TLS: one `SSLContext` per listener kind that never changes while the process runs, and a
table of per-certificate contexts, rebuilt once per config, that an SNI callback picks from.

Why this shape (docs/tls.md):
- uvloop binds a listening server to one `SSLContext` for its life, so that *base* context is built once
  per worker. Its SNI callback swaps each new connection onto the context of the certificate the client
  asked for (OpenSSL's ``SSL_set_SSL_CTX``): replacing certificates is one assignment of a new table,
  connections already open keep the context they were handed, and nothing is dropped.
- OpenSSL keeps the session-ticket keys in the base context, so tickets issued before a certificate
  reload still resume after it.
- What OpenSSL copies from the base context when a connection starts (protocol versions, whether a
  client certificate is asked for) applies at start only; the certificates, the CAs that verify client
  certificates and the CRLs come from the per-certificate context and reload live.
The handshake itself runs in OpenSSL, in uvloop's memory-BIO protocol: a slow client never blocks the
event loop, and `handshake_timeout` drops one that stalls.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import TYPE_CHECKING, Any

from tollway.config.tls import ClientAuth, ClientCas, ListenerTls, load_chain, pem_path
from tollway.protocol.tickets import set_ticket_keys

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.config.tls import Certificate

log = logging.getLogger("tollway.tls")

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _policy_context(settings: ListenerTls) -> ssl.SSLContext:
    """A server context with the protocol policy only: TLS 1.2+ (or 1.3), the cipher list, ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[settings.min_version]
    context.set_ciphers(settings.ciphers)
    context.set_alpn_protocols(list(settings.alpn))
    # Cipher preference is the server's (ours is ordered strongest-cheapest first); no renegotiation.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if not settings.session_tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def _load_client_auth(context: ssl.SSLContext, client_auth: ClientAuth | ClientCas) -> None:
    if client_auth.ca_file is not None:
        with pem_path(client_auth.ca_file) as ca_file:
            context.load_verify_locations(cafile=ca_file)
    for crl in client_auth.crl_files:
        context.load_verify_locations(cafile=crl)  # a PEM file may hold CRLs: they join the store
    if client_auth.crl_files:
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def crl_checking(settings: ListenerTls, certificates: list[Certificate]) -> bool:
    """Whether client certificates are checked against CRLs: any CRL configured anywhere turns it on
    for every name of the mtls listeners (OpenSSL takes the flag from the listener's context)."""
    if settings.client_auth is not None and settings.client_auth.crl_files:
        return True
    return any(c.client_auth is not None and c.client_auth.crl_files for c in certificates)


def _fixed_part(settings: ListenerTls, certificates: list[Certificate]) -> tuple[object, ...]:
    """The settings a running listener keeps until restart (CA and CRL files reload live)."""
    mode = settings.client_auth.mode if settings.client_auth is not None else None
    return (
        crl_checking(settings, certificates),
        settings.min_version,
        settings.ciphers,
        settings.session_tickets,
        tuple(settings.alpn),
        mode,
        settings.handshake_timeout,
    )


class CertificateTable:
    """SNI name → the context serving it, built once per config. Lookups are one or two dict probes:
    the exact name, then the wildcard of its parent domain (``*.example.com`` covers one label)."""

    __slots__ = ("contexts", "default", "exact", "names", "refuse_unknown", "wildcard")

    def __init__(self, config: GatewayConfig, previous: CertificateTable | None = None) -> None:
        settings = config.gateway.tls
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "*.example.com" under "example.com"
        self.names: dict[str, list[str]] = {}
        # Contexts by what they were built from: a reload reuses those whose entity, TLS settings and
        # files are unchanged, so thousands of certificates do not reload for a route change.
        self.contexts: dict[tuple[object, ...], ssl.SSLContext] = {}
        reusable = previous.contexts if previous is not None else {}
        by_name: dict[str, ssl.SSLContext] = {}
        for cert in config.certificates:
            key = _context_key(cert, settings)
            context = reusable.get(key) or certificate_context(cert, settings)
            self.contexts[key] = context
            by_name[cert.name] = context
            self.names[cert.name] = list(cert.snis)
            for sni in cert.snis:
                table = self.wildcard if sni.startswith("*.") else self.exact
                table.setdefault(sni[2:] if sni.startswith("*.") else sni, context)  # the first one wins
        default_name = settings.default_certificate
        if default_name is None and config.certificates:
            default_name = config.certificates[0].name
        self.default: ssl.SSLContext | None = by_name.get(default_name) if default_name else None
        self.refuse_unknown = settings.unknown_sni == "refuse"

    def lookup(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a client's SNI; None means refuse the handshake."""
        if server_name is None:
            return self.default
        name = server_name.lower()
        context = self.exact.get(name)
        if context is None:
            dot = name.find(".")
            if dot > 0:
                context = self.wildcard.get(name[dot + 1 :])
        if context is None and not self.refuse_unknown:
            return self.default
        return context


def _stamp(value: str | None) -> object:
    if value is None or value.lstrip().startswith("-----BEGIN"):
        return None  # absent, or PEM text (part of the entity itself)
    try:
        stat = os.stat(value)
    except OSError:
        return -1
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _context_key(cert: Certificate, settings: ListenerTls) -> tuple[object, ...]:
    auth = cert.client_auth or settings.client_auth
    files = [cert.cert, cert.key, cert.cert_alt, cert.key_alt, cert.passphrase_file]
    if auth is not None:
        files += [auth.ca_file, *auth.crl_files]
    passphrase_env = os.environ.get(cert.passphrase_env) if cert.passphrase_env else None
    # JSON: the models hold lists, so they are not hashable themselves.
    return (cert.model_dump_json(), settings.model_dump_json(), passphrase_env, *(_stamp(f) for f in files))


def certificate_context(cert: Certificate, settings: ListenerTls) -> ssl.SSLContext:
    context = _policy_context(settings)
    load_chain(context, cert)
    client_auth = cert.client_auth or settings.client_auth  # per SNI, else the listener's
    if client_auth is not None:
        _load_client_auth(context, client_auth)
        # Whether a certificate is asked for is the listener's (base context's) choice; this only makes
        # Python's getpeercert(), which reads the *current* context's mode, report what was verified.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class ServerTls:
    """A worker's TLS listeners: the fixed base contexts and the current certificate table."""

    def __init__(self, config: GatewayConfig) -> None:
        self.settings = config.gateway.tls
        try:
            self.table = CertificateTable(config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Validated by the supervisor a moment ago (a file removed since?): serve clear traffic, and
            # refuse TLS handshakes until a reload brings loadable certificates, rather than crash-loop.
            log.error("certificates could not be loaded; TLS handshakes fail until a reload: %s", exc)
            self.table = CertificateTable(config.model_copy(update={"certificates": []}))
        self._bases: dict[bool, ssl.SSLContext] = {}
        self._certificates = list(config.certificates)
        self._ticket_keys: bytes | None = None  # the node's, from the supervisor (tollway.protocol.tickets)

    @property
    def handshake_timeout(self) -> float:
        return self.settings.handshake_timeout

    def base_context(self, mtls: bool) -> ssl.SSLContext:
        """The context a listener is created with (one per kind, for the life of the worker)."""
        context = self._bases.get(mtls)
        if context is None:
            context = _policy_context(self.settings)
            client_auth = self.settings.client_auth
            if mtls and client_auth is not None:
                context.verify_mode = (
                    ssl.CERT_REQUIRED if client_auth.mode == "require" else ssl.CERT_OPTIONAL
                )
                # The CAs and CRLs are not needed here: verification uses the store of the certificate
                # context chosen by SNI. Whether CRLs are checked, though, is copied from this context.
                if crl_checking(self.settings, self._certificates):
                    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            context.sni_callback = self._select
            self._bases[mtls] = context
            if self._ticket_keys is not None:
                set_ticket_keys(context, self._ticket_keys)
        return context

    def share_ticket_keys(self, keys: bytes) -> None:
        """Use the node's session-ticket keys, so resumption works across workers."""
        self._ticket_keys = keys
        for context in self._bases.values():
            if not set_ticket_keys(context, keys):
                log.warning("session tickets stay per worker: the shared keys could not be set")
                return

    def apply(self, config: GatewayConfig) -> bool:
        """Swap in the certificates of a new config; on failure the current ones stay (and False)."""
        if not config.certificates and self._bases:
            # Listeners change at restart only: a config without certificates would leave the running
            # TLS listeners refusing every handshake. Keep serving the previous ones until then.
            log.warning(
                "the new config has no certificates; TLS listeners keep the previous ones until restart"
            )
            return False
        try:
            table = CertificateTable(config, self.table)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("certificates not reloaded, the previous ones stay: %s", exc)
            return False
        new = _fixed_part(config.gateway.tls, config.certificates)
        if new != _fixed_part(self.settings, self._certificates) and self._bases:
            log.warning("gateway.tls protocol settings changed: they apply at the next restart only")
        self.table = table
        return True

    def _select(self, conn: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> int | None:
        context = self.table.lookup(server_name)
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = context
        conn.tollway_sni = server_name or ""  # type: ignore[attr-defined]  # read by sni_of
        return None


def update_server_tls(
    current: ServerTls | None, config: GatewayConfig, has_listeners: bool
) -> ServerTls | None:
    """A worker's TLS after a config: None while it has no TLS listener (clear traffic pays nothing)."""
    if not has_listeners:
        return None
    if current is None:
        return ServerTls(config)
    current.apply(config)
    return current


def server_tls_options(tls: ServerTls | None, kind: str) -> dict[str, Any]:
    """Keyword arguments of `loop.create_server` for a listener of `kind` ("", "tls" or "mtls")."""
    if not kind or tls is None:
        return {}
    return {"ssl": tls.base_context(kind == "mtls"), "ssl_handshake_timeout": tls.handshake_timeout}


def sni_of(transport: Any) -> str:
    """The server name a TLS client asked for ("" without SNI); read once per connection."""
    ssl_object = transport.get_extra_info("ssl_object")
    return getattr(ssl_object, "tollway_sni", "") if ssl_object is not None else ""
