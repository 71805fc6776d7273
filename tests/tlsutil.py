"""Test certificates made with ``cryptography``: a CA, and certificates it signs.

    ca = TestCA()
    leaf = ca.issue("mx.e2e.test", ip="127.0.0.1")
    leaf.write(tmp_path)        # -> (cert.pem with the chain, key.pem)
    ctx = ca.client_context()   # ssl.SSLContext trusting only this CA

EC P-256 keys: generating one takes microseconds, so every test may make its own.
"""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]      # intermediates, leaf excluded

    @property
    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in [self.cert, *self.chain])

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def write(self, directory: Path, cert_name: str = "cert.pem",
              key_name: str = "key.pem") -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / cert_name, directory / key_name
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "mta test CA"):
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str, ip: str | None = "127.0.0.1", days: int = 30,
              expired: bool = False) -> Leaf:
        key = _key()
        cn = names[0] if names else "localhost"
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (names or ("localhost",))]
        if ip:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        start = _NOW - datetime.timedelta(days=1)
        end = _NOW + datetime.timedelta(days=days)
        if expired:
            start, end = _NOW - datetime.timedelta(days=10), _NOW - datetime.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        return Leaf(cert, key, [])

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        ctx = ssl.create_default_context(cadata=self.cert_pem.decode("ascii"))
        ctx.check_hostname = check_hostname
        return ctx


def self_signed(name: str = "localhost") -> Leaf:
    """A certificate that no TestCA trusts."""
    return TestCA(name).issue(name)


def encrypted_key_pem(leaf: Leaf, password: bytes = b"secret") -> bytes:
    return _pem_key(leaf.key, password)
