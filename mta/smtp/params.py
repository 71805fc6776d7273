"""MAIL and RCPT parameters (RFC 5321 §4.1.2 esmtp-param) and the
extensions we implement: SIZE (1870), BODY (6152, 3030), SMTPUTF8 (6531),
RET/ENVID/NOTIFY/ORCPT (3461) and AUTH (4954).

Parsers raise :class:`SMTPReplyError` with the reply to send.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .replies import R, SMTPReplyError

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+")


def _bad(text: str, code: int = 501, status: str = "5.5.4") -> SMTPReplyError:
    return SMTPReplyError(R(code, status, text))


def split_params(text: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` → ``{"KEY": "value", "KEY2": None}`` (keys upper-cased)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise _bad(f"Bad parameter syntax: {item}")
        if eq and not _VALUE.fullmatch(value):
            raise _bad(f"Bad parameter value: {item}")
        ukey = key.upper()
        if ukey in params:
            raise _bad(f"Duplicate parameter {ukey}")
        params[ukey] = value if eq else None
    return params


def xtext_decode(value: str) -> str:
    """Decode xtext; ``+XX`` escapes are octets, read together as UTF-8."""
    raw = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 value.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def xtext_encode(value: str) -> str:
    out = []
    for ch in value:
        o = ord(ch)
        if 33 <= o <= 126 and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str | None = None      # 7BIT, 8BITMIME, BINARYMIME
    smtputf8: bool = False
    ret: str | None = None       # FULL, HDRS
    envid: str | None = None     # xtext as received
    auth: str | None = None      # xtext mailbox or "<>"


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: str | None = None    # "NEVER" or comma list of SUCCESS,FAILURE,DELAY
    orcpt: str | None = None     # "addr-type;xtext" as received


def _need(key: str, value: str | None) -> str:
    if value is None:
        raise _bad(f"{key} parameter requires a value")
    return value


def _ascii_upper(value: str) -> str:
    """Upper-case a keyword value; non-ASCII is left as is, so that e.g.
    'ı'.upper() == 'I' cannot turn '8bitmıme' into '8BITMIME'."""
    return value.upper() if value.isascii() else value


def parse_mail_params(text: str, *, esmtp: bool) -> MailParams:
    params = split_params(text)
    if params and not esmtp:
        raise _bad("Parameters not allowed after HELO", 555)
    kw: dict[str, object] = {}
    for key, value in params.items():
        if key == "SIZE":
            v = _need(key, value)
            # ASCII digits only: str.isdigit() also accepts '²' (int() fails)
            # and other scripts' digits (int() takes them).
            if not (v.isascii() and v.isdigit()) or len(v) > 20:
                raise _bad("Bad SIZE parameter")
            kw["size"] = int(v)
        elif key == "BODY":
            v = _ascii_upper(_need(key, value))
            if v not in ("7BIT", "8BITMIME", "BINARYMIME"):
                raise _bad("Bad BODY parameter", 501, "5.5.4")
            kw["body"] = v
        elif key == "SMTPUTF8":
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            kw["smtputf8"] = True
        elif key == "RET":
            v = _ascii_upper(_need(key, value))
            if v not in ("FULL", "HDRS"):
                raise _bad("Bad RET parameter")
            kw["ret"] = v
        elif key == "ENVID":
            v = _need(key, value)
            if not _XTEXT.fullmatch(v) or len(v) > 100:
                raise _bad("Bad ENVID parameter")
            kw["envid"] = v
        elif key == "AUTH":
            v = _need(key, value)
            if v != "<>" and not _XTEXT.fullmatch(v):
                raise _bad("Bad AUTH parameter")
            kw["auth"] = v
        else:
            raise _bad(f"Unsupported parameter {key}", 555)
    return MailParams(**kw)  # type: ignore[arg-type]


_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


def parse_rcpt_params(text: str, *, esmtp: bool) -> RcptParams:
    params = split_params(text)
    if params and not esmtp:
        raise _bad("Parameters not allowed after HELO", 555)
    kw: dict[str, str] = {}
    for key, value in params.items():
        if key == "NOTIFY":
            v = _ascii_upper(_need(key, value))
            words = v.split(",")
            if v == "NEVER":
                pass
            elif (not all(w in _NOTIFY_WORDS for w in words)
                  or len(set(words)) != len(words)):
                raise _bad("Bad NOTIFY parameter")
            kw["notify"] = v
        elif key == "ORCPT":
            v = _need(key, value)
            atype, semi, addr = v.partition(";")
            if (not semi or not _ADDR_TYPE.fullmatch(atype) or len(v) > 500
                    or not (_XTEXT.fullmatch(addr) or
                            (atype.lower() == "utf-8" and addr and addr.isprintable()))):
                raise _bad("Bad ORCPT parameter")
            kw["orcpt"] = v
        else:
            raise _bad(f"Unsupported parameter {key}", 555)
    return RcptParams(**kw)
