"""Server-side TLS: the certificate chain and key from ``[tls]`` as a context factory.

:class:`ServerTLS` is what STARTTLS (``transport.startTLS``) and implicit-TLS
listeners (``ssl:`` endpoints without their own ``privateKey=``) are given.
It provides ``IOpenSSLContextFactory`` and hands out the context of the
certificate loaded most recently, so :meth:`ServerTLS.reload` (SIGHUP)
changes the certificate for new handshakes without a restart; a reload that
fails keeps the old certificate.

TLS 1.2 is the minimum (RFC 8996, RFC 8314); ciphers are Twisted's defaults
(forward-secret AEAD suites first).
"""
from __future__ import annotations

import datetime
from typing import Any

from zope.interface import implementer
from twisted.internet.interfaces import IOpenSSLContextFactory

__all__ = ["TLSError", "ServerTLS", "MIN_VERSIONS", "connection_info"]

MIN_VERSIONS = ("1.2", "1.3")


class TLSError(Exception):
    """A certificate or key cannot be used.  ``str()`` is one line:
    ``[tls] KEY: PATH: what is wrong``."""

    def __init__(self, key: str, path: str, message: str):
        self.key = key
        self.path = path
        self.message = " ".join(message.split())
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"[tls] {self.key}: {self.path}: {self.message}"


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)
        raise TLSError(key, path, f"cannot read file: {reason}") from None


def _openssl_message(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 300 else text[:300] + "..."


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    def __init__(self, certificate: str, private_key: str,
                 min_version: str = MIN_VERSIONS[0]):   # also [tls] min_version's default
        self.certificate_path = certificate
        self.private_key_path = private_key
        self.min_version = min_version
        self._options: Any = None
        self.subject = ""
        self.not_after: datetime.datetime | None = None

    # -- loading ----------------------------------------------------------------
    def load(self) -> None:
        """Read and check the files; raise TLSError (and keep the previous
        certificate, if any) when they cannot be used."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from twisted.internet import ssl

        cpath, kpath = self.certificate_path, self.private_key_path
        cdata = _read("certificate", cpath)
        kdata = _read("private_key", kpath)
        try:
            chain = x509.load_pem_x509_certificates(cdata)
        except ValueError as e:
            raise TLSError("certificate", cpath,
                           f"not a PEM certificate chain: {_openssl_message(e)}") from None
        try:
            key = serialization.load_pem_private_key(kdata, password=None)
        except TypeError:
            raise TLSError("private_key", kpath,
                           "the private key is encrypted; store it without a passphrase") from None
        except (ValueError, Exception) as e:  # noqa: B014 (unsupported key types raise others)
            raise TLSError("private_key", kpath,
                           f"not a PEM private key: {_openssl_message(e)}") from None
        leaf = chain[0]
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            matches = key.public_key().public_bytes(*fmt) == leaf.public_key().public_bytes(*fmt)
        except Exception:
            matches = False
        if not matches:
            raise TLSError("private_key", kpath,
                           f"does not match the (first) certificate in {cpath}")
        minimum = (ssl.TLSVersion.TLSv1_3 if self.min_version == "1.3"
                   else ssl.TLSVersion.TLSv1_2)
        try:
            options = ssl.CertificateOptions(privateKey=key, certificate=leaf,
                                             extraCertChain=chain[1:], raiseMinimumTo=minimum)
            options.getContext()  # build it now: problems show at startup, not per client
        except Exception as e:
            raise TLSError("certificate", cpath,
                           f"cannot be used with its key: {_openssl_message(e)}") from None
        self._options = options
        self.subject = leaf.subject.rfc4514_string()
        try:
            self.not_after = leaf.not_valid_after_utc
        except AttributeError:  # cryptography < 42
            self.not_after = leaf.not_valid_after.replace(tzinfo=datetime.timezone.utc)

    def expired(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return self.not_after is not None and self.not_after < now

    @property
    def loaded(self) -> bool:
        return self._options is not None

    # -- IOpenSSLContextFactory ---------------------------------------------------
    def getContext(self) -> Any:
        if self._options is None:
            raise RuntimeError("no TLS certificate loaded")
        return self._options.getContext()


def connection_info(handle: Any) -> tuple[str, str, int]:
    """(version, cipher, bits) of an ``OpenSSL.SSL.Connection``; empty when unknown."""
    try:
        version = handle.get_protocol_version_name() or ""
        cipher = handle.get_cipher_name() or ""
        bits = handle.get_cipher_bits() or 0
    except Exception:
        return "", "", 0
    return version, cipher, bits
