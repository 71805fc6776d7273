"""Salted password hashes with ``hashlib.scrypt``.

A hash is one self-describing string, so the cost parameters can be raised
later without invalidating existing entries::

    $scrypt$n=16384,r=8,p=1$<salt, base64>$<derived key, base64>

The defaults (N=2^14, r=8, p=1: 16 MiB and some tens of milliseconds per
check) are the interactive-login parameters recommended for scrypt.  Checks
compare in constant time; :func:`dummy_verify` spends the same effort for an
unknown user so that timing does not tell which user names exist.

A user may also have a CRAM-MD5 secret (``mta passwd add --cram-md5``), in
the form of Dovecot's ``CRAM-MD5`` password scheme::

    {CRAM-MD5}<64 hex digits>

32 octets: the HMAC-MD5 outer state, then the inner state (the MD5 states
after hashing ``key ^ opad`` and ``key ^ ipad``, see :mod:`mta.auth.md5`),
each as four little-endian 32-bit words.  It is not the password, but it is
as good as the password for CRAM-MD5, and it is unsalted and cheap to test
guesses against: it weakens what scrypt protects, which is why it is only
stored for the users who need CRAM-MD5.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct

from .md5 import State, hmac_md5_finish, hmac_md5_states

__all__ = ["DEFAULT_N", "DEFAULT_R", "DEFAULT_P", "HashError", "hash_password",
           "verify_password", "dummy_verify", "check_hash", "CRAM_MD5_PREFIX",
           "cram_md5_secret", "check_cram_md5_secret", "verify_cram_md5",
           "dummy_verify_cram_md5"]

DEFAULT_N = 1 << 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Upper bounds on what a (possibly hand-edited) file may ask us to compute.
_MAX_N = 1 << 20
_MAX_R = 32
_MAX_P = 16

_FORMAT = re.compile(r"\$scrypt\$n=(\d{1,8}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]+={0,2})"
                     r"\$([A-Za-z0-9+/]+={0,2})")


class HashError(ValueError):
    """A stored hash is not in a form we understand."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HashError("bad base64 in hash") from None


def _maxmem(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B.
    return 128 * r * (n + p + 2) + (1 << 20)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p),
                          dklen=dklen)


def hash_password(password: str | bytes, *, n: int = DEFAULT_N, r: int = DEFAULT_R,
                  p: int = DEFAULT_P, salt: bytes | None = None) -> str:
    """A new salted hash string for *password* (str is encoded as UTF-8)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    _check_params(n, r, p)
    key = _scrypt(password, salt, n, r, p, KEY_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1) or n > _MAX_N:
        raise HashError(f"scrypt n must be a power of two between 2 and {_MAX_N}, got {n}")
    if not 1 <= r <= _MAX_R:
        raise HashError(f"scrypt r must be between 1 and {_MAX_R}, got {r}")
    if not 1 <= p <= _MAX_P:
        raise HashError(f"scrypt p must be between 1 and {_MAX_P}, got {p}")


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    m = _FORMAT.fullmatch(stored)
    if m is None:
        raise HashError("not a $scrypt$n=...,r=...,p=...$salt$hash string")
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    _check_params(n, r, p)
    salt, key = _unb64(m.group(4)), _unb64(m.group(5))
    if not salt or len(key) < 16:
        raise HashError("salt or derived key too short")
    return n, r, p, salt, key


def check_hash(stored: str) -> None:
    """Raise HashError if *stored* is not a usable hash string."""
    _parse(stored)


def verify_password(password: str | bytes, stored: str) -> bool:
    """Does *password* match the hash string *stored*?  Raises HashError for a
    malformed hash (callers treat that as a failed login and log it)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    n, r, p, salt, key = _parse(stored)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(key)), key)


_DUMMY_SALT = os.urandom(SALT_BYTES)


def dummy_verify(password: str | bytes) -> bool:
    """Spend what a real check costs, and fail (for unknown users)."""
    if isinstance(password, str):
        password = password.encode("utf-8", "replace")
    _scrypt(password, _DUMMY_SALT, DEFAULT_N, DEFAULT_R, DEFAULT_P, KEY_BYTES)
    return False


# --------------------------------------------------------------------------- CRAM-MD5

CRAM_MD5_PREFIX = "{CRAM-MD5}"
_CRAM_FORMAT = re.compile(r"\{CRAM-MD5\}([0-9a-fA-F]{64})")
_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{32}")


def cram_md5_secret(password: str | bytes) -> str:
    """The ``{CRAM-MD5}...`` secret for *password* (str is encoded as UTF-8)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    inner, outer = hmac_md5_states(password)
    return CRAM_MD5_PREFIX + struct.pack("<8I", *outer, *inner).hex()


def _parse_cram(stored: str) -> tuple[State, State]:
    m = _CRAM_FORMAT.fullmatch(stored)
    if m is None:
        raise HashError("not a {CRAM-MD5} followed by 64 hex digits")
    words = struct.unpack("<8I", bytes.fromhex(m.group(1)))
    return words[4:8], words[0:4]


def check_cram_md5_secret(stored: str) -> None:
    """Raise HashError if *stored* is not a usable CRAM-MD5 secret."""
    _parse_cram(stored)


def verify_cram_md5(stored: str, challenge: bytes, response: bytes) -> bool:
    """Is *response* (the hex digest a client sent, either case) the
    HMAC-MD5 of *challenge* under the password *stored* was made from?"""
    inner, outer = _parse_cram(stored)
    expected = hmac_md5_finish(inner, outer, challenge).hex().encode("ascii")
    if _HEX_DIGEST.fullmatch(response) is None:
        return False
    return hmac.compare_digest(expected, response.lower())


_DUMMY_CRAM = cram_md5_secret(os.urandom(16))


def dummy_verify_cram_md5(challenge: bytes, response: bytes) -> bool:
    """Spend what a real CRAM-MD5 check costs, and fail (for unknown users)."""
    verify_cram_md5(_DUMMY_CRAM, challenge, response)
    return False
