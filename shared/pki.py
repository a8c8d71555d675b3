"""Certificates for the embedded servers: a private CA that ``aic up`` generates into its data folder,
and the server certificate it signs; clients trust that CA only.

A private CA, not a self-signed server certificate, so that a server certificate can be reissued
(new address, expiry) without every client learning a new file, and a client can verify the
server's name (``127.0.0.1``, ``localhost``, this host's name) rather than trusting whatever answers.
Keys are ECDSA P-256, written owner-only (0600).  The CA's key stays in the data folder so that
``aic up`` can reissue; a deployment with its own CA points the clients at it (``AIC_NATS_CA``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.endpoints import write_private

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
#: Reissue a server certificate this long before it expires.
RENEW_BEFORE = dt.timedelta(days=30)


class PkiError(RuntimeError):
    """Certificates could not be made or loaded."""


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise PkiError("generating certificates needs the cryptography package: pip install 'aic[embedded]'") from None
    return x509, hashes, serialization, ec


@dataclass(frozen=True)
class ServerTls:
    """The files a TLS server and its clients need."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key) -> str:
    _, _, serialization, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert) -> str:
    _, _, serialization, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(common_name: str = "aic local CA", days: int = 3650):
    """A new CA: (private key, certificate)."""
    x509, hashes, _, ec = _crypto()
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def sign_server(ca_key, ca_cert, names: list[str], days: int = 397):
    """A server certificate for ``names`` (host names and IP addresses), signed by the CA."""
    x509, hashes, _, ec = _crypto()
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def default_names() -> list[str]:
    """What a client on this machine may call the server: the loopback addresses and this host's name."""
    return ["127.0.0.1", "localhost", "::1", socket.gethostname()]


def ensure_server_tls(folder: Path, names: list[str] | None = None, stem: str = "server") -> ServerTls:
    """The CA and a server certificate under ``folder``: made on first use, the server certificate
    reissued when it nears expiry or lacks one of ``names``; the CA is kept (clients trust it).
    ``stem`` names the certificate's files (``server.pem``/``server.key``; ``api`` for the HTTP
    API's, signed by the same CA)."""
    x509, _, serialization, _ = _crypto()
    names = names or default_names()
    folder.mkdir(parents=True, exist_ok=True)
    tls = ServerTls(folder / CA_FILE, folder / f"{stem}.pem", folder / f"{stem}.key")
    ca_key_path = folder / CA_KEY_FILE
    if tls.ca_file.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key, ca_cert = make_ca()
        write_private(ca_key_path, _key_pem(ca_key))
        tls.ca_file.write_text(_cert_pem(ca_cert))  # public: clients copy it
        tls.cert_file.unlink(missing_ok=True)
    if not _server_cert_fits(tls, ca_cert, names):
        key, cert = sign_server(ca_key, ca_cert, names)
        write_private(tls.key_file, _key_pem(key))
        tls.cert_file.write_text(_cert_pem(cert))
    return tls


def _server_cert_fits(tls: ServerTls, ca_cert, names: list[str]) -> bool:
    x509, _, _, _ = _crypto()
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    if not tls.key_file.exists() or cert.issuer != ca_cert.subject:
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(n in have or _ip_str(n) in have for n in names)


def _ip_str(n: str) -> str:
    try:
        return str(ipaddress.ip_address(n))
    except ValueError:
        return n


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A TLS client context that trusts ``ca_file`` only (the system's CAs when None) and checks the
    server's name: TLS 1.2 or later."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (FileNotFoundError, ssl.SSLError) as exc:
        raise PkiError(f"cannot load the CA certificate {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
