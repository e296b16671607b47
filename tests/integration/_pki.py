"""Certificates generated for the TLS tests: a CA, a server certificate and client certificates.

`make_pki(root)` writes them as PEM files under `root` (the server reads files, so do the CLI's flags)
and returns their bytes too (what grpc's channel credentials take). The server certificate is for
127.0.0.1 and localhost; "ground-station-1" is a client certificate signed by the same CA, "intruder"
one signed by another CA. Keys are P-256; everything is valid for a day.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: bytes
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    client_cert_file: Path
    client_key_file: Path
    stranger_cert: bytes
    stranger_key: bytes
    stranger_cert_file: Path
    stranger_key_file: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_pki(root: Path) -> Pki:
    """Generates the certificates and writes them under `root`."""
    pem = serialization.Encoding.PEM
    ca_key, other_ca_key = _key(), _key()
    ca = _cert("AetherOps test CA", ca_key, None, ca=True)
    other_ca = _cert("Someone else's CA", other_ca_key, None, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("127.0.0.1", server_key, (ca, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    client = _cert("ground-station-1", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _cert("intruder", stranger_key, (other_ca, other_ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca.pem": ca.public_bytes(pem),
        "server.pem": server.public_bytes(pem),
        "server.key": _pem_key(server_key),
        "client.pem": client.public_bytes(pem),
        "client.key": _pem_key(client_key),
        "stranger.pem": stranger.public_bytes(pem),
        "stranger.key": _pem_key(stranger_key),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(
        ca=files["ca.pem"],
        ca_file=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        client_cert=files["client.pem"],
        client_key=files["client.key"],
        client_cert_file=root / "client.pem",
        client_key_file=root / "client.key",
        stranger_cert=files["stranger.pem"],
        stranger_key=files["stranger.key"],
        stranger_cert_file=root / "stranger.pem",
        stranger_key_file=root / "stranger.key",
    )
