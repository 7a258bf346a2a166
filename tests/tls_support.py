"""Certificates made at test time with `cryptography`: a CA, server certificates for several names (RSA
or ECDSA), client certificates, expired or near-expiry ones, encrypted keys, CRLs. Nothing here is
committed as a file: every test writes what it needs under its tmp_path."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_NOW = datetime.datetime.now(datetime.UTC)


def _key(kind: str) -> Key:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Issued:
    cert: x509.Certificate
    key: Key
    chain: list[x509.Certificate]  # intermediates, if any

    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain])

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        algorithm = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, algorithm
        )

    def write(self, directory: Path, stem: str, passphrase: bytes | None = None) -> tuple[str, str]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem())
        key_path.write_bytes(self.key_pem(passphrase))
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()


class CA:
    def __init__(self, name: str = "Tollway Test CA", kind: str = "ec", parent: CA | None = None) -> None:
        self.key = _key(kind)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.parent = parent
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.name if parent is not None else subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(parent.key if parent is not None else self.key, hashes.SHA256())
        )

    def intermediate(self, name: str = "Tollway Test Intermediate") -> CA:
        """A CA signed by this one: its certificates carry it in their chain."""
        return CA(name, parent=self)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str = "ca") -> str:
        path = directory / f"{stem}.crt"
        path.write_bytes(self.cert_pem())
        return str(path)

    def issue(
        self,
        names: list[str],
        kind: str = "ec",
        client: bool = False,
        days: float = 365,
        common_name: str | None = None,
        expired: bool = False,
    ) -> Issued:
        key = _key(kind)
        cn = common_name or (names[0] if names else "client")
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        start = _NOW - datetime.timedelta(days=30 if expired else 1)
        end = _NOW - datetime.timedelta(days=1) if expired else _NOW + datetime.timedelta(days=days)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        chain = [self.cert] if self.parent is not None else []  # the intermediate follows the leaf
        return Issued(builder.sign(self.key, hashes.SHA256()), key, chain)

    def crl(self, revoked: list[Issued]) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(_NOW - datetime.timedelta(days=1))
            .next_update(_NOW + datetime.timedelta(days=30))
        )
        for issued in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(issued.cert.serial_number)
                .revocation_date(_NOW - datetime.timedelta(hours=1))
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def client_context(
    ca_file: str | None = None,
    cert: tuple[str, str] | None = None,
    maximum: ssl.TLSVersion | None = None,
    minimum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A verifying client context trusting `ca_file`, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    if maximum is not None:
        context.maximum_version = maximum
    if minimum is not None:
        context.minimum_version = minimum
    return context


# -- one self-signed certificate for 127.0.0.1 (the HTTP client's and the Redis client's TLS tests) --
LOCALHOST = ipaddress.ip_address("127.0.0.1")


@dataclass
class SelfSigned:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts this certificate only (and checks the name: 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.cert_file))


def self_signed(directory: Path) -> SelfSigned:
    """A certificate for 127.0.0.1, valid for an hour, written as PEM files into `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    found = SelfSigned(directory / "cert.pem", directory / "key.pem")
    found.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return found
