"""MD5 (RFC 1321) with its chaining state in the open, for stored HMAC-MD5 keys.

CRAM-MD5 (RFC 2195) is HMAC-MD5 (RFC 2104) keyed with the password.  HMAC
starts by hashing one 64-octet block, ``key ^ ipad`` for the inner hash and
``key ^ opad`` for the outer one; the MD5 states after those blocks (four
32-bit words each) are all a server needs to check a response later, so the
password itself need not be stored — Dovecot's ``CRAM-MD5`` password scheme
stores exactly these two states.  ``hashlib`` cannot hand out or take in an
MD5 state, hence this small pure-Python MD5: :func:`compress` is the
compression function, :func:`hmac_md5_states` makes the two states from a
key and :func:`hmac_md5_finish` completes an HMAC from them.

Speed does not matter here: a CRAM-MD5 check is a handful of blocks.
"""
from __future__ import annotations

import hashlib
import math
import struct

__all__ = ["State", "IV", "compress", "md5_from", "hmac_md5_states", "hmac_md5_finish"]

State = tuple[int, int, int, int]

IV: State = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
BLOCK = 64
_MASK = 0xFFFFFFFF
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2 ** 32) & _MASK for i in range(64)]
# Which message word round i uses (RFC 1321 §3.4).
_WORD = ([i for i in range(16)] + [(5 * i + 1) % 16 for i in range(16)]
         + [(3 * i + 5) % 16 for i in range(16)] + [(7 * i) % 16 for i in range(16)])


def compress(state: State, block: bytes) -> State:
    """The state after one 64-octet *block* (RFC 1321 §3.4)."""
    if len(block) != BLOCK:
        raise ValueError("an MD5 block is 64 octets")
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
        elif i < 32:
            f = (d & b) | (~d & c)
        elif i < 48:
            f = b ^ c ^ d
        else:
            f = c ^ (b | (~d & _MASK))
        f = (f + a + _K[i] + x[_WORD[i]]) & _MASK
        s = _SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return ((state[0] + a) & _MASK, (state[1] + b) & _MASK,
            (state[2] + c) & _MASK, (state[3] + d) & _MASK)


def md5_from(state: State, done: int, data: bytes) -> bytes:
    """The MD5 digest of a message whose first *done* octets (a multiple of
    64) left the hash in *state* and whose remaining octets are *data*."""
    if done % BLOCK:
        raise ValueError("done must be a whole number of blocks")
    length = done + len(data)
    data = data + b"\x80" + b"\0" * ((55 - len(data)) % BLOCK) + struct.pack("<Q", (length * 8)
                                                                            & (2 ** 64 - 1))
    for i in range(0, len(data), BLOCK):
        state = compress(state, data[i:i + BLOCK])
    return struct.pack("<4I", *state)


def hmac_md5_states(key: bytes) -> tuple[State, State]:
    """(inner, outer): the MD5 states after ``key ^ ipad`` and ``key ^ opad``
    (RFC 2104; a key longer than 64 octets is replaced by its MD5 digest)."""
    if len(key) > BLOCK:
        key = hashlib.md5(key).digest()
    key = key.ljust(BLOCK, b"\0")
    inner = compress(IV, bytes(k ^ 0x36 for k in key))
    outer = compress(IV, bytes(k ^ 0x5C for k in key))
    return inner, outer


def hmac_md5_finish(inner: State, outer: State, message: bytes) -> bytes:
    """HMAC-MD5 of *message* under the key the two states were made from."""
    return md5_from(outer, BLOCK, md5_from(inner, BLOCK, message))
