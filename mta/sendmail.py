"""Local submission: a ``sendmail``-compatible command.

Installed as ``mta sendmail`` and as a ``sendmail`` console script that can be
linked into place (``ln -s .../bin/sendmail /usr/sbin/sendmail``).  It reads
one message from standard input and writes it straight into the spool (one
transaction, as the SMTP server does before its ``250``); no daemon needs to
run to accept it, and the running daemon delivers it at its next poll.

Flags (the ones scripts, cron and mail user agents use)::

    sendmail [flags] [recipient ...]
      -t             recipients also from To:/Cc:/Bcc: (Resent-To:/-Cc:/-Bcc:
                     when the message has any); Bcc: is removed from the message
      -f ADDR, -r ADDR   envelope sender ("" or "<>": the null sender);
                     default: the invoking user @ [sendmail] domain
      -F NAME        the full name for the From: field added when there is none
      -i, -oi        a line with a single dot does not end the message
                     (without it, such a line ends it, as in sendmail)
      -bm            read a message and queue it (the default)
      -bp            list the queue (= mta queue list)
      -q             flush the queue (= mta queue flush --all);
                     -qRdomain flushes one domain, -qIqueue-id one message
      -bi, -I        initialize the alias database: nothing to do, exit 0
      --config PATH  the configuration (default $MTA_CONFIG, else etc/mta.toml)

Accepted and ignored, as nullmailer does: -B type, -C file, -d, -G, -h N,
-L tag, -m, -n, -N dsn, -o option (other than -oi), -O option=value, -p
protocol, -R ret, -U, -v (prints the queue id on stderr), -V envid, -X
logfile, -A c|m.

Recipient arguments may be lists ("a@x, Bob <b@y>") of well-formed
addresses, each ``addr``, ``<addr>`` or ``Name <addr>`` (comments allowed);
anything else in an argument (text after the ``>``, a second ``<...>``, a
group, a control character such as a newline, bytes that are not UTF-8) is
refused with EX_USAGE, and so is a ``-f`` that is not one such address.
Bare local names ("root") are qualified with ``[sendmail] domain`` ("" =
``[server] hostname``).  Line ends are made CRLF; Date:, Message-ID: and
From: are added when missing, and our Received: line (``with local``) is
prepended.

Exit statuses (sysexits.h): 0 queued; 64 EX_USAGE (bad flags, no or bad
recipient or sender arguments, arguments that are not UTF-8); 65 EX_DATAERR
(no recipients in the header with -t, a bad header address, a message too
big or with a line over 998 octets);
75 EX_TEMPFAIL (the spool could not take the message: try again later);
78 EX_CONFIG (the configuration file).
"""
from __future__ import annotations

import email.utils
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from .message import InboundMessage

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

USAGE = """\
usage: sendmail [-t] [-i] [-f sender] [-F full-name] [--config PATH] [recipient ...]
       sendmail -bp            (list the queue)
       sendmail -q[Rdomain]    (flush the queue)
Reads a message from standard input and queues it.  See also: mta queue --help.
"""

# getopt-style: a value attached ("-fme@x") or the next argument ("-f me@x").
_WITH_VALUE = set("ABCFLNORVXbfhopr")
_OPTIONAL_VALUE = set("dq")     # only attached: "-q", "-q30m", "-d0.1"
_FLAGS = set("GIUimntv")


class UsageError(Exception):
    pass


class DataError(Exception):
    pass


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False          # -t
    ignore_dots: bool = False      # -i, -oi
    sender: str | None = None      # -f, -r
    full_name: str | None = None   # -F
    mode: str = "m"                # -b; "q" for -q, "help" for --help
    flush_domain: str | None = None
    flush_id: str | None = None
    verbose: bool = False
    config: str | None = None


def parse_args(argv: list[str]) -> Options:
    """Parse sendmail's command line (options may come after recipients, as
    with GNU getopt; ``--`` ends the options)."""
    o = Options()
    i = 0
    operands_only = False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if operands_only or arg == "-" or not arg.startswith("-"):
            o.recipients.append(arg)
            continue
        if arg == "--":
            operands_only = True
            continue
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "help":
                o.mode = "help"
            elif name == "config":
                if not eq:
                    if i >= len(argv):
                        raise UsageError("option --config requires an argument")
                    value = argv[i]
                    i += 1
                o.config = value
            else:
                raise UsageError(f"unknown option {arg}")
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c in _FLAGS:
                if c == "i":
                    o.ignore_dots = True
                elif c == "t":
                    o.extract = True
                elif c == "v":
                    o.verbose = True
                elif c == "I":
                    o.mode = "i"
                continue
            if c in _OPTIONAL_VALUE:
                value = arg[j:]
                if c == "q":
                    o.mode = "q"
                    if value[:1] == "R" and value[1:]:
                        o.flush_domain = value[1:]
                    elif value[:1] == "I" and value[1:]:
                        o.flush_id = value[1:]
                break
            if c in _WITH_VALUE:
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option -{c} requires an argument")
                    value = argv[i]
                    i += 1
                _option(o, c, value)
                break
            raise UsageError(f"unknown option -{c}")
    return o


def _option(o: Options, c: str, value: str) -> None:
    if c in "fr":
        o.sender = value
    elif c == "F":
        o.full_name = value
    elif c == "o":
        if value == "i":
            o.ignore_dots = True
    elif c == "b":
        if value in ("m", "p", "i"):
            o.mode = value
        else:
            raise UsageError(f"-b{value} is not supported (only -bm, -bp, -bi)")
    # everything else: accepted and ignored


# --------------------------------------------------------------------------- addresses

def qualify(address: str, domain: str) -> str:
    """The address with a bare local name qualified, checked as an RFC 5321
    mailbox (UTF-8 allowed; a source route is dropped); ValueError if it is
    not one."""
    from .address import AddressError, parse_path

    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1].strip()
    if not a:
        raise ValueError("empty address")
    if "@" not in a:
        a = f"{a}@{domain}"
    try:
        mailbox = parse_path(f"<{a}>", utf8=True)
    except AddressError as e:
        raise ValueError(f"bad address {address.strip()!r}: {e}") from None
    return str(mailbox)


# An RFC 5322 display name once comments are gone: words (atoms, with the
# obsolete "." of "John Q. Public", UTF-8 allowed, or quoted strings)
# separated by white space.  Each word is found one way only: linear time.
_WORD = r"""(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\u0080-\U0010ffff]+|"(?:[^"\\]|\\.)*")"""
_PHRASE = re.compile(rf"[ \t]*(?:{_WORD}(?:[ \t]+{_WORD})*)?[ \t]*", re.S)


def split_address_list(text: str, *, strict: bool = False) -> list[str]:
    """The mailboxes of an RFC 5322 address list, as written: the part in
    angle brackets, or the whole element; display names, comments and group
    names are dropped (``Bob <b@y> (work), group: c@z;`` → ``b@y``, ``c@z``).
    Strict on purpose (unlike email.utils.getaddresses, which turns
    ``foo bar`` into ``foo``): a malformed element is returned as it is, for
    :func:`qualify` to refuse.

    *strict* (command-line arguments): only ``addr``, ``<addr>`` and
    ``Name <addr>`` elements separated by commas; a group, a ``;``, a control
    character, a second ``<...>``, text after the ``>`` or a display name
    that is not a phrase is a ValueError rather than something to guess at."""
    items: list[str] = []
    cur: list[str] = []
    quote = literal = escaped = False
    comment = 0
    angle = False
    opens = 0            # "<" in the current element (outside quotes and comments)
    opened_at = closed_at = -1   # where in cur its "<" and ">" are

    def bad(why: str) -> ValueError:
        return ValueError(f"bad address {text.strip()!r}: {why}")

    def end_item() -> None:
        nonlocal opens, opened_at, closed_at
        raw = "".join(cur)
        item = raw.strip()
        cur.clear()
        n_opens, start, close = opens, opened_at, closed_at
        opens, opened_at, closed_at = 0, -1, -1
        if not item:
            return
        if strict and ("<" in item or ">" in item):
            if n_opens != 1 or close < start:
                raise bad("expected one address in <...>")
            if raw[close + 1:].strip():
                raise bad("text after the closing '>'")
            if not _PHRASE.fullmatch(raw[:start]):
                raise bad("the name before '<' is not a valid display name")
            item = raw[start + 1:close].strip()
            if item:
                items.append(item)
            return
        if "<" in item or ">" in item:
            start, stop = item.rfind("<"), item.rfind(">")
            if start < 0 or stop < start:
                raise ValueError(f"bad address {item!r}: unbalanced angle brackets")
            item = item[start + 1:stop].strip()
            if not item:
                return
        items.append(item)

    if strict:
        for ch in text:
            if (ord(ch) < 0x20 and ch != "\t") or ch == "\x7f":
                raise bad("control character in the address")
    for ch in text:
        if escaped:
            escaped = False
            if not comment:
                cur.append(ch)
            continue
        if comment:
            if ch == "\\":
                escaped = True
            elif ch == "(":
                comment += 1
            elif ch == ")":
                comment -= 1
            continue
        if quote or literal:
            cur.append(ch)
            if ch == "\\":
                escaped = True
            elif (ch == '"' and quote) or (ch == "]" and literal):
                quote = literal = False
            continue
        if ch == "(":
            comment = 1
            cur.append(" ")
        elif ch == '"':
            quote = True
            cur.append(ch)
        elif ch == "[":
            literal = True
            cur.append(ch)
        elif ch == "<":
            angle = True
            opens += 1
            opened_at = len(cur)
            cur.append(ch)
        elif ch == ">":
            angle = False
            closed_at = len(cur)
            cur.append(ch)
        elif ch in ":;" and not angle and strict:
            raise bad("a group is not an address")
        elif ch == ":" and not angle:
            cur.clear()               # a group's display name
            opens, opened_at, closed_at = 0, -1, -1
        elif ch in ",;" and not angle:
            end_item()
        else:
            cur.append(ch)
    if quote or comment or angle:
        raise ValueError(f"bad address list {text.strip()!r}: unterminated "
                         + ("quoted string" if quote else "comment" if comment else "<"))
    end_item()
    return items


def address_list(text: str, domain: str, *, strict: bool = False) -> list[str]:
    """The addresses of an address list ("a@x, Bob <b@y>, group: c@z;"),
    qualified and checked (*strict*: see :func:`split_address_list`)."""
    return [qualify(a, domain) for a in split_address_list(text, strict=strict)]


def sender_argument(text: str, domain: str) -> str:
    """``-f``/``-r``: exactly one well-formed address (``addr``, ``<addr>``
    or ``Name <addr>``), qualified; ValueError if it is anything else."""
    items = split_address_list(text, strict=True)
    if len(items) != 1:
        raise ValueError(f"bad sender address {text.strip()!r}: expected one address")
    return qualify(items[0], domain)


def default_user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{os.getuid()}"


# --------------------------------------------------------------------------- the message

def read_message(stream: BinaryIO, *, ignore_dots: bool, limit: int) -> bytes:
    """Standard input up to EOF (or, without *ignore_dots*, a line that is
    only a dot).  DataError when it is longer than *limit* (0: no limit)."""
    data = bytearray()
    for line in stream:
        if not ignore_dots and line.rstrip(b"\r\n") == b".":
            break
        data += line
        if limit and len(data) > limit:
            raise DataError(f"message larger than the limit of {limit} octets")
    return bytes(data)


def _fields(block: bytes) -> list[bytes]:
    """Header fields (with their continuation lines), each ending in CRLF."""
    out: list[bytes] = []
    for line in block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def _name(f: bytes) -> str:
    return f.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _value(f: bytes) -> str:
    value = f.split(b":", 1)[1] if b":" in f else b""
    return re.sub(rb"\r\n(?=[ \t])", b"", value).strip().decode("utf-8", "surrogateescape")


@dataclass
class Prepared:
    fields: list[bytes]           # the header fields to keep (Bcc removed) plus the ones added
    body: bytes
    header_recipients: list[str]  # with -t


def prepare(raw: bytes, *, extract: bool, domain: str, from_field: str, hostname: str,
            queue_id: str, now: float) -> Prepared:
    from .message import split_header_block
    from .smtp.data import normalize_newlines

    data = bytes(normalize_newlines(raw))
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"From "):       # an mbox "From " line is not a header field
        data = data[data.index(b"\r\n") + 2:]
    n = split_header_block(data)
    block, body = data[:n], data[n:]
    if block.endswith(b"\r\n\r\n"):
        block = block[:-2]
    elif block == b"\r\n":
        block = b""
    fields = _fields(block)
    names = {_name(f) for f in fields}

    rcpts: list[str] = []
    if extract:
        resent = {"resent-to", "resent-cc", "resent-bcc"} & names
        wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        for f in fields:
            if _name(f) in wanted:
                try:
                    rcpts.extend(address_list(_value(f), domain))
                except ValueError as e:
                    raise DataError(f"{_name(f).title()}: {e}") from None
    fields = [f for f in fields if _name(f) not in ("bcc", "resent-bcc")]

    if "from" not in names:
        fields.append(b"From: " + from_field.encode("utf-8") + b"\r\n")
    if "date" not in names:
        fields.append(b"Date: " + email.utils.formatdate(now, localtime=True).encode() + b"\r\n")
    if "message-id" not in names:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        fields.append(f"Message-ID: <{stamp}.{queue_id}@{hostname}>\r\n".encode())
    return Prepared(fields, body, rcpts)


def received_field(*, hostname: str, queue_id: str, recipients: list[str], now: float) -> bytes:
    lines = [f"Received: by {hostname} (mta, from userid {os.getuid()})",
             f"\twith local id {queue_id}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{email.utils.formatdate(now, localtime=True)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# --------------------------------------------------------------------------- main

def _queue_command(o: Options, config_path: str, err: Any) -> int:
    """-bp and -q: the queue command's list and flush."""
    import argparse

    from . import queuecmd
    from .cli import CommandError, output_gone

    if o.mode == "p":
        args = argparse.Namespace(config=config_path, state=None, domain=None, sender=None,
                                  older_than=None, json=False)
        fn = queuecmd.run_list
    else:
        ids = [o.flush_id] if o.flush_id else []
        args = argparse.Namespace(config=config_path, queue_ids=ids, domain=o.flush_domain,
                                  all=not ids and not o.flush_domain, parser=None)
        fn = queuecmd.run_flush
    try:
        status = fn(args)
    except CommandError as e:
        err(str(e))
        return EX_TEMPFAIL
    except BrokenPipeError:
        return output_gone()
    return EX_OK if status == 0 else EX_TEMPFAIL


def main(argv: list[str] | None = None, *, prog: str = "sendmail",
         stdin: BinaryIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def err(text: str) -> None:
        print(f"{prog}: {text}", file=sys.stderr)

    try:
        o = parse_args(argv)
    except UsageError as e:
        err(str(e))
        sys.stderr.write(USAGE)
        return EX_USAGE
    if o.mode == "help":
        sys.stdout.write(USAGE)
        return EX_OK
    if o.mode == "i":
        return EX_OK

    from .cli import config_path as which_config, is_text, shown
    from .config import ConfigError, load_config

    # Addresses, names and queue ids are text; only file names may be any bytes.
    for value in [*o.recipients, o.sender, o.full_name, o.flush_domain, o.flush_id]:
        if value is not None and not is_text(value):
            err(f"argument '{shown(value)}' is not valid UTF-8 text")
            return EX_USAGE
    if o.full_name is not None and any(ord(c) < 0x20 or c == "\x7f" for c in o.full_name):
        # A newline would start a header field of the caller's choosing.
        err(f"bad full name {o.full_name!r}: control character")
        return EX_USAGE
    config_path = which_config(o.config)
    try:
        config = load_config(config_path)
    except ConfigError as e:
        err(str(e))
        return EX_CONFIG
    if o.mode in ("p", "q"):
        return _queue_command(o, config_path, err)

    hostname = config.server.hostname
    domain = config.sendmail.domain or hostname
    try:
        if o.sender is None:
            sender = qualify(default_user(), domain)
        elif o.sender.strip() in ("", "<>"):
            sender = ""
        else:
            sender = sender_argument(o.sender, domain)
        rcpts = [a for arg in o.recipients for a in address_list(arg, domain, strict=True)]
        if o.recipients and not rcpts:
            raise ValueError(f"no address in {' '.join(o.recipients)!r}")
    except ValueError as e:
        err(str(e))
        return EX_USAGE
    if not rcpts and not o.extract:
        err("no recipients given (name them, or use -t to read them from the message)")
        return EX_USAGE

    from .message import InboundMessage, Recipient, new_queue_id
    from .smtp.data import has_long_line

    now = time.time()
    qid = new_queue_id(now)
    try:
        from_addr = sender or qualify(default_user(), domain)
    except ValueError:
        from_addr = f"MAILER-DAEMON@{domain}"
    from_field = _from_field(o.full_name, from_addr)
    limit = config.server.max_message_size
    try:
        raw = read_message(stdin or sys.stdin.buffer, ignore_dots=o.ignore_dots, limit=limit)
        p = prepare(raw, extract=o.extract, domain=domain, from_field=from_field,
                    hostname=hostname, queue_id=qid, now=now)
        rcpts = _unique(rcpts + p.header_recipients)
        if not rcpts:
            raise DataError("no recipient addresses found in the message header")
        headers = (received_field(hostname=hostname, queue_id=qid, recipients=rcpts, now=now)
                   + b"".join(p.fields) + b"\r\n")
        size = len(headers) + len(p.body)
        if limit and size > limit:
            raise DataError(f"message larger than the limit of {limit} octets")
        if has_long_line(headers + p.body):
            raise DataError("message has a line longer than 998 octets")
    except DataError as e:
        err(str(e))
        return EX_DATAERR
    eight_bit = not (headers.isascii() and p.body.isascii())
    msg = InboundMessage(
        queue_id=qid, sender=sender, recipients=[Recipient(a) for a in rcpts], headers=headers,
        body=p.body, arrival=now, client_address="127.0.0.1", helo=hostname, protocol="local",
        size=size, body_type="8BITMIME" if eight_bit else None,
        smtputf8=not all(a.isascii() for a in [sender, *rcpts]))
    try:
        store(config.spool.url, msg, hostname=hostname, lock_timeout=config.spool.lock_timeout)
    except Exception as e:
        err(f"cannot queue the message: {' '.join(str(e).split())}")
        return EX_TEMPFAIL
    if o.verbose:
        err(f"queued as {qid}")
    return EX_OK


def _unique(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out


def _from_field(full_name: str | None, address: str) -> str:
    if not full_name:
        return address
    if address.isascii():
        return email.utils.formataddr((full_name, address), charset="utf-8")
    return email.utils.formataddr((full_name, "x@x"), charset="utf-8")[:-5] + f"<{address}>"


def store(url: str, msg: InboundMessage, *, hostname: str, lock_timeout: float) -> None:
    from .spool.admin import SpoolAdmin

    spool = SpoolAdmin.open(url, hostname=hostname, create=True, lock_timeout=lock_timeout)
    try:
        spool.submit([msg])
    finally:
        spool.close()


# --------------------------------------------------------------------------- mta sendmail

def register(subparsers: Any) -> None:
    import argparse
    # Sendmail's flags are not argparse's: everything after "sendmail" is
    # handed over as is (no prefix character, so "-t" is an ordinary value).
    p = subparsers.add_parser("sendmail", add_help=False, prefix_chars="\x00",
                              help="submit a message from standard input (sendmail flags)",
                              description="A sendmail-compatible local submission command.")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: main(args.args, prog="mta: sendmail"),
                   checks_own_arguments=True)    # exit 64, as sendmail, not 2


if __name__ == "__main__":
    raise SystemExit(main())
