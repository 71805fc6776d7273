"""Salted password hashes with ``hashlib.scrypt``.

A hash is one self-describing string, so the cost parameters can be raised
later without invalidating existing entries::

    $scrypt$n=16384,r=8,p=1$<salt, base64>$<derived key, base64>

The defaults (N=2^14, r=8, p=1: 16 MiB and some tens of milliseconds per
check) are the interactive-login parameters recommended for scrypt.  Checks
compare in constant time; :func:`dummy_verify` spends the same effort for an
unknown user so that timing does not tell which user names exist.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

__all__ = ["DEFAULT_N", "DEFAULT_R", "DEFAULT_P", "HashError", "hash_password",
           "verify_password", "dummy_verify", "check_hash"]

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
