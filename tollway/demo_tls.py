"""The HTTPS side of `tollway demo`: a self-signed certificate made at start (nothing is shipped), and one
request over it, verified against that certificate the way a user's curl would."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
from pathlib import Path

SOURCE = "127.0.0.7"


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1, valid 30 days, and its ECDSA key: (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tollway demo")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "demo-cert.pem", directory / "demo-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def https_status(port: int, cert_path: str, path: str) -> tuple[int, str]:
    """GET over HTTPS, trusting only the demo's certificate: (status, TLS version)."""
    context = ssl.create_default_context(cafile=cert_path)
    # From an address of its own, so the demo's request takes nothing from your rate limit at 127.0.0.1.
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=10, context=context, source_address=(SOURCE, 0)
    )
    try:
        conn.connect()
    except OSError:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        version = conn.sock.version() if conn.sock is not None else ""
        return resp.status, version or ""
    finally:
        conn.close()
