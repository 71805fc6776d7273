"""aliases(5) files, the mailboxes list, and alias expansion.

Syntax (the aliases(5) format of Sendmail and Postfix):

* ``name: value1, value2, ...``; the name is a local part (no domain),
  folded to lower case; in double quotes when it holds special characters
  (``"john doe": john``).  A name given twice: the first entry counts (the
  second is logged and ignored, as postalias(1) does).
* A line that starts with whitespace continues the logical line before it;
  empty lines and lines whose first non-blank character is ``#`` are
  ignored (also between continuation lines).  A ``#`` elsewhere is text.
* Values are separated by commas (and by blanks inside one comma-separated
  item, outside double quotes).  A value is:

  - an address: ``user@remote.example`` is relayed; ``user`` or
    ``user@<a local domain>`` is local and is looked up in the aliases
    again; ``Full Name <user@example>`` gives the address in brackets;
  - ``\\user``: the mailbox of ``user``, not expanded further;
  - ``:include:/path``: the values listed in that file (same syntax as the
    right-hand side, any number per line, ``#`` comment lines); a relative
    path is taken from the aliases file's directory;
  - ``|command`` and ``/file/name``: **not supported** — such a value is
    refused with a log line when the file is loaded, and an expansion that
    meets it reports a problem (``5.3.5``).

Expansion (``AliasTable.expand``) is recursive, depth first, in file order,
each final address once.  Loops:

* A name in its own expansion (``root: root, admin@example.net``) is the
  mailbox of that name: this is how an alias keeps a local copy, and what
  Postfix's local(8) does (it does not expand an alias again inside its own
  expansion) and Sendmail too.
* Any other cycle (``a: b`` + ``b: a``), an ``:include:`` that includes
  itself, or more than ``max_depth`` levels is a mail forwarding loop: that
  branch is dropped with a problem ``5.4.6`` (Postfix bounces such mail
  with 5.4.6 once its nesting limit is reached; here the other members are
  still delivered).

``Expansion.failure`` says what becomes of the recipient as a whole: a
temporary problem (an aliases or include file that cannot be read now:
``4.3.0``) defers it entirely — before anything is delivered, so the retry
cannot duplicate — otherwise it fails only when no member is left
(the first problem), and else it is "expanded" (RFC 3461 §6.2.7) into
``mailboxes`` (local addresses to deliver to) and ``remote`` (to relay).

Files are re-read when they change: every lookup compares the file's
device, inode, size, mtime and ctime with those of the last load (one
``stat`` call; ``stat`` and ``read`` are injected for tests), so an edit
in place and a new file renamed over the old one are both seen.  A file
that cannot be read raises :class:`TableUnavailable` (temporary, 4.3.0).

The mailboxes file (``[local] mailboxes``) lists who exists: one local part
(any local domain) or address (that domain only) per line, ``#`` comments.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from twisted.logger import Logger

from ..address import AddressError, parse_path

log = Logger(namespace="mta.local")

Kind = Literal["address", "include", "command", "file"]
DEFAULT_MAX_DEPTH = 20


class TableUnavailable(Exception):
    """An aliases, include or mailboxes file cannot be read: the lookup must
    be retried later (``status`` 4.3.0)."""

    status = "4.3.0"


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    value: str                 # the address, include path, command or file name
    noexpand: bool = False     # ``\\user``: the mailbox, no alias lookup
    source: str = ""           # "path:line"


@dataclass(frozen=True, slots=True)
class AliasDef:
    name: str                  # lower-cased
    targets: tuple[Target, ...]
    source: str                # "path:line"


def _split_outside_quotes(text: str, seps: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    angle = 0
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            angle += 1
        elif not quoted and ch == ">" and angle:
            angle -= 1
        elif not quoted and not angle and ch in seps:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def _unquote(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s[1:-1])


def _is_quoted(s: str) -> bool:
    return len(s) >= 2 and s[0] == '"' and s[-1] == '"' and not s.endswith('\\"')


def _check_address(addr: str) -> str | None:
    """None when *addr* is a usable address or local part, else why not."""
    probe = addr if "@" in addr else f"{addr}@localhost"
    try:
        parse_path(f"<{probe}>", utf8=True)
    except AddressError as e:
        return str(e)
    return None


def _parse_item(item: str, source: str, warnings: list[str]) -> list[Target]:
    item = item.strip()
    if not item:
        return []
    if _is_quoted(item):
        inner = _unquote(item)
        if inner.startswith("|"):
            return [Target("command", inner, source=source)]
        if inner.startswith("/"):
            return [Target("file", inner, source=source)]
        if inner.lower().startswith(":include:"):
            return [Target("include", inner[9:].strip(), source=source)]
    if item.startswith("|"):
        return [Target("command", item, source=source)]
    if item.lower().startswith(":include:"):
        path = item[9:].strip()
        if _is_quoted(path):
            path = _unquote(path)
        if not path:
            warnings.append(f"{source}: :include: without a file name")
            return []
        return [Target("include", path, source=source)]
    if item.startswith("/"):
        return [Target("file", item, source=source)]
    m = re.fullmatch(r'(?:[^<>"]|"(?:[^"\\]|\\.)*")*<([^<>]*)>\s*', item)
    words = [m.group(1).strip()] if m else [w for w in _split_outside_quotes(item, " \t") if w]
    out = []
    for w in words:
        noexpand = w.startswith("\\")
        addr = w[1:] if noexpand else w
        if noexpand and "@" in addr:
            noexpand = False   # ``\\user@domain``: the backslash means nothing for a domain
        why = _check_address(addr) if addr else "empty address"
        if why:
            warnings.append(f"{source}: bad address {w!r} ({why}): ignored")
            continue
        out.append(Target("address", addr, noexpand, source))
    return out


def parse_targets(text: str, source: str, warnings: list[str], line_no: int = 1) -> list[Target]:
    """The values of one right-hand side (or an :include: file's lines)."""
    out: list[Target] = []
    for item in _split_outside_quotes(text, ","):
        out.extend(_parse_item(item, f"{source}:{line_no}", warnings))
    return out


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, text) of each logical line, comments removed."""
    start = 0
    parts: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t" and parts:
            parts.append(stripped)
            continue
        if parts:
            yield start, " ".join(parts)
        start, parts = n, [stripped]
    if parts:
        yield start, " ".join(parts)


def parse_aliases(text: str, source: str = "aliases") -> tuple[dict[str, AliasDef], list[str]]:
    """Parse an aliases(5) file: the entries by (lower-cased) name, and one
    warning line per thing ignored (each with ``source:line``)."""
    entries: dict[str, AliasDef] = {}
    warnings: list[str] = []
    for n, line in _logical_lines(text):
        where = f"{source}:{n}"
        if line[0] in " \t":
            warnings.append(f"{where}: continuation line without an entry: ignored")
            continue
        pieces = _split_outside_quotes(line, ":")
        if len(pieces) < 2:
            warnings.append(f"{where}: no ':' after the name: ignored")
            continue
        name_part = pieces[0].strip()
        rhs = line[len(pieces[0]) + 1:]
        if _is_quoted(name_part):
            name = _unquote(name_part)
        elif '"' in name_part or "@" in name_part or not name_part:
            warnings.append(f"{where}: bad name {name_part!r} (a local part; quote special "
                            "characters): ignored")
            continue
        else:
            name = name_part
        name = name.lower()
        targets = parse_targets(rhs, source, warnings, n)
        for t in targets:
            if t.kind in ("command", "file"):
                warnings.append(f"{where}: alias {name}: {t.kind} target {t.value!r} refused: "
                                "delivery to commands and files is not supported")
        if name in entries:
            warnings.append(f"{where}: duplicate alias {name!r} (first at "
                            f"{entries[name].source}): ignored")
            continue
        if not targets:
            warnings.append(f"{where}: alias {name} has no usable value")
        entries[name] = AliasDef(name, tuple(targets), where)
    return entries, warnings


def parse_include(text: str, source: str) -> tuple[list[Target], list[str]]:
    """An :include: file: right-hand-side values, any number per line."""
    warnings: list[str] = []
    out: list[Target] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.extend(parse_targets(s, source, warnings, n))
    return out, warnings


def parse_mailboxes(text: str, source: str = "mailboxes",
                    normalize_domain: Callable[[str], str] = str.lower
                    ) -> tuple[frozenset[str], list[str]]:
    """The mailboxes file: lower-cased local parts and ``local@domain``
    addresses (domain normalised), and warnings."""
    names: set[str] = set()
    warnings: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        word, *rest = s.split()
        if rest and not rest[0].startswith("#"):
            warnings.append(f"{source}:{n}: one mailbox per line: {' '.join(rest)!r} ignored")
        why = _check_address(word)
        if why:
            warnings.append(f"{source}:{n}: bad mailbox {word!r} ({why}): ignored")
            continue
        local, at, domain = word.rpartition("@") if "@" in word else (word, "", "")
        names.add(f"{_local_key(local)}@{normalize_domain(domain)}" if at else _local_key(local))
    return frozenset(names), warnings


def _local_key(local: str) -> str:
    """A local part as it is compared: unquoted, lower-cased (Postfix's
    local(8) folds case too)."""
    if _is_quoted(local):
        local = _unquote(local)
    return local.lower()


def _split(addr: str) -> tuple[str, str]:
    local, at, domain = addr.rpartition("@")
    return (local, domain) if at else (addr, "")


# ---------------------------------------------------------------------------
# Files that are re-read when they change
# ---------------------------------------------------------------------------

def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


StatFn = Callable[[str], os.stat_result]
ReadFn = Callable[[str], str]


class _Watched:
    """A file's parsed content, re-parsed when its stat signature changes."""

    def __init__(self, path: str, parse: Callable[[str, str], tuple[object, list[str]]],
                 stat: StatFn, read: ReadFn):
        self.path = path
        self._parse = parse
        self._stat = stat
        self._read = read
        self._sig: tuple | None = None
        self._value: object = None
        self.loads = 0

    def get(self) -> object:
        try:
            st = self._stat(self.path)
        except OSError as e:
            raise TableUnavailable(f"cannot read {self.path}: {e.strerror or e}") from None
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if sig != self._sig:
            try:
                text = self._read(self.path)
            except OSError as e:
                raise TableUnavailable(f"cannot read {self.path}: {e.strerror or e}") from None
            value, warnings = self._parse(text, self.path)
            for w in warnings:
                log.warn("{warning}", warning=w)
            self._value, self._sig = value, sig
            self.loads += 1
            if self.loads > 1:
                log.info("{path}: changed, reloaded", path=self.path)
        return self._value


# ---------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Problem:
    status: str                # "5.4.6" loop, "5.3.5" unsupported target, "4.3.0" file unreadable
    text: str

    @property
    def temporary(self) -> bool:
        return self.status.startswith("4")


@dataclass
class Expansion:
    """What a local recipient stands for."""
    address: str                                        # the recipient expanded
    expanded: bool = False                              # it was an alias
    mailboxes: list[str] = field(default_factory=list)  # local addresses to deliver to
    remote: list[str] = field(default_factory=list)     # addresses to relay
    problems: list[Problem] = field(default_factory=list)

    @property
    def failure(self) -> Problem | None:
        """Why the recipient cannot be delivered now (temporary: defer it
        all) or at all (nothing left); None when it can."""
        for p in self.problems:
            if p.temporary:
                return p
        if not self.mailboxes and not self.remote:
            return self.problems[0] if self.problems else Problem(
                "5.3.5", f"alias {self.address} has no usable member")
        return None


class AliasTable:
    """An aliases(5) file, re-read when it changes, and expansion.

    *is_local(domain)* says whether a (normalised) domain is delivered here;
    *normalize_domain* is the one domain normalisation (the caller's);
    *exists(local, domain)*, when given, is asked for each mailbox found
    (a member that does not exist is a problem ``5.1.1``).
    """

    def __init__(self, path: str | None, *, is_local: Callable[[str], bool],
                 normalize_domain: Callable[[str], str] = str.lower,
                 max_depth: int = DEFAULT_MAX_DEPTH,
                 stat: StatFn = os.stat, read: ReadFn = _read_text):
        self.path = path
        self._is_local = is_local
        self._norm = normalize_domain
        self._max_depth = max_depth
        self._stat = stat
        self._read = read
        self._file = _Watched(path, parse_aliases, stat, read) if path else None
        self._includes: dict[str, _Watched] = {}

    def entries(self) -> dict[str, AliasDef]:
        if self._file is None:
            return {}
        return self._file.get()  # type: ignore[return-value]

    def lookup(self, name: str) -> AliasDef | None:
        """The alias for a local part (any case, quoted or not), or None.
        Raises TableUnavailable when the file cannot be read."""
        return self.entries().get(_local_key(name))

    def _include(self, path: str) -> list[Target]:
        if not os.path.isabs(path) and self.path:
            path = os.path.join(os.path.dirname(os.path.abspath(self.path)), path)
        w = self._includes.get(path)
        if w is None:
            w = self._includes[path] = _Watched(path, parse_include, self._stat, self._read)
        return w.get()  # type: ignore[return-value]

    def expand(self, local_part: str, domain: str,
               exists: Callable[[str, str], bool] | None = None) -> Expansion:
        """Expand the local recipient ``local_part@domain`` (the domain as
        given, one of ours)."""
        domain = self._norm(domain)
        exp = Expansion(f"{local_part}@{domain}")
        seen: set[str] = set()

        def mailbox(local: str, dom: str) -> None:
            key = f"{_local_key(local)}@{dom}"
            if key in seen:
                return
            seen.add(key)
            try:
                known = exists is None or exists(local, dom)
            except TableUnavailable as e:
                exp.problems.append(Problem(e.status, str(e)))
                return
            if not known:
                exp.problems.append(Problem("5.1.1", f"no mailbox {local}@{dom}"))
                return
            exp.mailboxes.append(f"{local}@{dom}")

        def remote(addr: str) -> None:
            local, dom = _split(addr)
            key = f"{local}@{dom.lower()}"
            if key not in seen:
                seen.add(key)
                exp.remote.append(addr)

        try:
            entries = self.entries()          # one stat for the whole expansion
        except TableUnavailable as e:
            exp.problems.append(Problem(e.status, str(e)))
            return exp

        def visit(local: str, dom: str, chain: tuple[str, ...]) -> None:
            name = _local_key(local)
            entry = entries.get(name)
            if entry is None:
                mailbox(local, dom)
                return
            if not chain:
                exp.expanded = True
            run(entry.name, entry.targets, dom, chain + (name,))

        def run(name: str, targets: Iterable[Target], dom: str, chain: tuple[str, ...]) -> None:
            if len(chain) > self._max_depth:
                exp.problems.append(Problem("5.4.6", "mail forwarding loop: alias expansion "
                                            f"deeper than {self._max_depth} levels at {name}"))
                return
            for t in targets:
                if t.kind in ("command", "file"):
                    exp.problems.append(Problem(
                        "5.3.5", f"alias {name} ({t.source}): {t.kind} target {t.value!r} is "
                        "not supported"))
                elif t.kind == "include":
                    key = f":include:{t.value}"
                    if key in chain:
                        exp.problems.append(Problem(
                            "5.4.6", f"mail forwarding loop: {t.value} includes itself "
                            f"({' -> '.join(chain)})"))
                        continue
                    try:
                        inc = self._include(t.value)
                    except TableUnavailable as e:
                        exp.problems.append(Problem(e.status, f"alias {name}: {e}"))
                        continue
                    run(name, inc, dom, chain + (key,))
                else:
                    local, mdom = _split(t.value)
                    if mdom:
                        mdom_n = self._norm(mdom)
                        if not self._is_local(mdom_n):
                            remote(t.value)
                            continue
                    else:
                        mdom_n = dom
                    key = _local_key(local)
                    if t.noexpand or key == name:
                        mailbox(local, mdom_n)        # its own mailbox
                    elif key in chain:
                        names = [c for c in chain if not c.startswith(":include:")]
                        exp.problems.append(Problem(
                            "5.4.6", "mail forwarding loop: "
                            f"{' -> '.join(names[names.index(key):] + [key])}"))
                    else:
                        visit(local, mdom_n, chain)

        visit(local_part, domain, ())
        return exp


class MailboxList:
    """The ``[local] mailboxes`` file, re-read when it changes.
    ``path=None``: every local part exists."""

    def __init__(self, path: str | None, *, normalize_domain: Callable[[str], str] = str.lower,
                 stat: StatFn = os.stat, read: ReadFn = _read_text):
        self._norm = normalize_domain
        self._file = _Watched(
            path, lambda text, src: parse_mailboxes(text, src, normalize_domain), stat, read
        ) if path else None

    def exists(self, local_part: str, domain: str) -> bool:
        """Is ``local_part@domain`` a mailbox?  Raises TableUnavailable."""
        if self._file is None:
            return True
        names = self._file.get()
        key = _local_key(local_part)
        return key in names or f"{key}@{self._norm(domain)}" in names  # type: ignore[operator]


def is_local_recipient(aliases: AliasTable, mailboxes: MailboxList, local_part: str,
                       domain: str) -> bool:
    """The RCPT-time check for a local domain: an alias or a mailbox (the
    caller answers 550 5.1.1 otherwise; TableUnavailable → 451 4.3.0)."""
    return aliases.lookup(local_part) is not None or mailboxes.exists(local_part, domain)
