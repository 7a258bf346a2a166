"""Client-side TLS to backends (docs/tls.md): verifying contexts built once per TLS setting, not per
connection (building one and loading the system CAs costs milliseconds).

A context is cached under its `UpstreamTls` settings and the modification times of the files they name,
so services with the same settings share a context (and a pool per address), and a reload after a CA
bundle or client certificate was replaced in place builds a new one.
"""

from __future__ import annotations

import logging
import os
import ssl

from tollway.config.tls import UpstreamTls, is_pem_text, pem_path

log = logging.getLogger("tollway.upstream")

_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext] = {}


def _stamp(path: str | None) -> float:
    if path is None or is_pem_text(path):
        return 0.0
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def client_context(spec: UpstreamTls) -> ssl.SSLContext:
    """The verifying (or, with `verify: false`, non-verifying) context for these settings."""
    key = (spec, _stamp(spec.ca_file), _stamp(spec.client_cert), _stamp(spec.client_key))
    context = _CONTEXTS.get(key)
    if context is None:
        if len(_CONTEXTS) > 256:  # settings that came and went in many reloads
            _CONTEXTS.clear()
        context = _CONTEXTS[key] = _build(spec)
    return context


def _build(spec: UpstreamTls) -> ssl.SSLContext:
    # TLS 1.2+ and hostname checking; the system CAs, or only the configured bundle.
    if spec.ca_file is None:
        context = ssl.create_default_context()
    elif is_pem_text(spec.ca_file):
        context = ssl.create_default_context(cadata=spec.ca_file)
    else:
        context = ssl.create_default_context(cafile=spec.ca_file)
    if not spec.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if spec.client_cert is not None and spec.client_key is not None:
        with pem_path(spec.client_cert) as cert_file, pem_path(spec.client_key) as key_file:
            context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_name(spec: UpstreamTls, host: str) -> str:
    """The SNI name sent (and verified): the configured one, else the host being connected to."""
    return spec.server_name or host


def describe_failure(exc: ssl.SSLError, label: str, name: str | None) -> str:
    """A log-ready reason for a failed TLS handshake with a backend."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return f"TLS certificate of {label} (name {name!r}) rejected: {detail}"
    return f"TLS handshake with {label} failed: {exc.reason or exc}"
