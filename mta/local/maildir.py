"""Delivery into a Maildir, following maildir(5).

``deliver(maildir, content, sender=..., recipient=...)`` writes one message
and returns a :class:`~mta.local.result.LocalResult`.  It blocks (file
writes and fsyncs): the caller runs it off the reactor thread
(``deferToThread`` or a thread pool of its own).

How a message is written:

1. the Maildir and its ``cur``, ``new`` and ``tmp`` are created when
   missing (mode 0700; the parent directory is fsynced so the new entries
   survive a crash);
2. the message goes to ``tmp/<unique name>``, opened with ``O_EXCL`` (a
   name taken by someone else is never overwritten: a new name is drawn),
   and the file is fsynced;
3. it is hard-linked to ``new/<unique name>`` (``link`` fails rather than
   overwrite; a file system without hard links gets a ``rename``), the
   ``new`` directory is fsynced, and the ``tmp`` name is removed.

So a file in ``new/`` is always complete: a crash before step 3 leaves at
most a file in ``tmp/`` (maildir(5) readers ignore ``tmp/``; its stale
files can be removed after 36 hours), never a partial file in ``new/``.  If
the fsync of ``new/`` fails, the linked file is removed again and the
result is temporary, so that a retry cannot deliver the message twice.

The unique name is maildir(5)'s modern form
``<seconds>.M<microseconds>P<pid>Q<counter>.<hostname>`` (``/`` and ``:``
in the host name written as ``\\057`` and ``\\072``): unique across
processes (pid), threads of one process (the counter) and hosts sharing
the directory (the host name).

Content: ``Return-Path: <sender>`` (RFC 5321 §4.4; ``<>`` for the null
sender) and ``Delivered-To: <recipient>`` (the final, post-alias address,
as Postfix's local(8) and virtual(8) write it) are put in front; the
message itself is written byte for byte, except that with ``lf=True`` (the
default) every CRLF becomes LF.  That is the Maildir convention: Postfix's
local(8)/virtual(8), qmail and Dovecot (``mail_save_crlf = no``, its
default) all store LF line ends, and MUAs reading Maildirs expect them.
The spool holds CRLF-only text, so the conversion is exact and reversible.
Pass ``lf=False`` for BINARYMIME content, where a CRLF need not be a line
end: it is then written exactly as stored (the two header lines end in
CRLF too).

Errors are results, never exceptions: ENOSPC → ``452 4.3.1``, EDQUOT →
``452 4.2.2``, a permission problem (EACCES, EPERM, EROFS) or a path
component that is not a directory → ``451 4.2.0``, any other OSError →
``451 4.3.0``; all temporary.  The only permanent result is for an address
that cannot go into a header line (a control character: ``553 5.1.3`` for
the recipient, ``553 5.1.7`` for the sender), which the server never
accepts in the first place.

``maildir_for(template, local_part, domain)`` makes the Maildir path of a
mailbox from the ``[local] maildir`` template (``{user}``: the local part,
lower-cased; ``{domain}``).  A local part or domain that could leave the
template's directory (``/``, a leading ``.``, a NUL or other control
character, empty) raises :class:`MaildirPathError`, permanent ``5.1.3``.
``check_template`` validates the template for the configuration.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import socket
import string
import threading
import time

from twisted.logger import Logger

from .result import LocalResult

log = Logger(namespace="mta.local")

TEMPLATE_FIELDS = ("user", "domain")
WRITE_CHUNK = 1 << 20
_NAME_TRIES = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class MaildirPathError(ValueError):
    """This local part or domain cannot name a Maildir (it would leave the
    template's directory).  Permanent: ``status`` is 5.1.3."""

    status = "5.1.3"
    code = 553


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

def check_template(template: str) -> None:
    """Raise ValueError (one line) unless *template* is a usable ``maildir``
    template: only the fields ``{user}`` and ``{domain}``, no format specs."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("maildir: must be a non-empty path template")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"maildir: bad template {template!r}: {e}") from None
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conv:
            raise ValueError(f"maildir: unknown field {{{field}}} in {template!r} "
                             f"(use {{user}} and {{domain}})")


def _path_part(value: str, what: str) -> str:
    if not value:
        raise MaildirPathError(f"empty {what}")
    if "/" in value or value.startswith(".") or _CONTROL.search(value):
        raise MaildirPathError(f"{what} {value!r} cannot name a mailbox directory")
    return value


def maildir_for(template: str, local_part: str, domain: str) -> str:
    """The Maildir of ``local_part@domain``: *template* with ``{user}`` =
    the local part lower-cased (give it unquoted: ``Mailbox.local_text``)
    and ``{domain}`` = the domain lower-cased (give it normalised).  Raises
    MaildirPathError for a value that would escape the directory."""
    user = _path_part(local_part.lower(), "local part")
    dom = _path_part(domain.lower(), "domain")
    return template.format(user=user, domain=dom)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def _host_part(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072")


def unique_name(hostname: str | None = None, now: float | None = None) -> str:
    """A maildir(5) unique name: ``sec.M<usec>P<pid>Q<n>.host``."""
    t = time.time() if now is None else now
    sec = int(t)
    usec = int((t - sec) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    host = _host_part(hostname if hostname is not None else socket.gethostname())
    return f"{sec}.M{usec}P{os.getpid()}Q{n}.{host}"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: str) -> bool:
    """Create *path* (mode 0700); True when it was created."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
        return False
    return True


def ensure_maildir(maildir: str) -> None:
    """Create the Maildir with ``cur``, ``new`` and ``tmp`` where missing
    (0700; parents with the default mode) and fsync what was created."""
    parent = os.path.dirname(os.path.abspath(maildir))
    if not os.path.isdir(maildir):
        os.makedirs(parent, exist_ok=True)
        if _mkdir(maildir):
            _fsync_dir(parent)
    made = False
    for sub in ("tmp", "new", "cur"):
        made |= _mkdir(os.path.join(maildir, sub))
    if made:
        _fsync_dir(maildir)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:WRITE_CHUNK])
        view = view[n:]


def _header_lines(sender: str, recipient: str, eol: bytes) -> bytes:
    return (b"Return-Path: <" + sender.encode("utf-8") + b">" + eol
            + b"Delivered-To: " + recipient.encode("utf-8") + eol)


def _os_error(e: OSError, maildir: str, step: str) -> LocalResult:
    why = e.strerror or str(e)
    detail = f"cannot deliver to maildir {maildir}: {step}: {why}"
    if e.errno == errno.ENOSPC:
        return LocalResult.make(452, "4.3.1", f"{detail} (insufficient system storage)")
    if e.errno == errno.EDQUOT:
        return LocalResult.make(452, "4.2.2", f"{detail} (mailbox full)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ELOOP,
                   errno.EEXIST):
        return LocalResult.make(451, "4.2.0", detail)
    return LocalResult.make(451, "4.3.0", detail)


def _place(tmp_path: str, new_dir: str, name: str, hostname: str | None) -> str:
    """Link the finished tmp file into new/ under a free name; returns it."""
    use_rename = False
    for _ in range(_NAME_TRIES):
        target = os.path.join(new_dir, name)
        if use_rename:
            if not os.path.lexists(target):
                os.rename(tmp_path, target)
                return target
        else:
            try:
                os.link(tmp_path, target)
                return target
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                                   errno.EMLINK):
                    raise
                use_rename = True   # no hard links on this file system
                continue
        name = unique_name(hostname)
    raise FileExistsError(errno.EEXIST, "no free name in new/", new_dir)


def deliver(maildir: str, content: bytes | bytearray | memoryview, *, sender: str,
            recipient: str, lf: bool = True, hostname: str | None = None) -> LocalResult:
    """Write one message into *maildir* (created when missing) for
    *recipient*, from *sender* ("" for ``<>``).  Blocking.  Returns
    ``250 2.0.0`` with the file's path in the text, or a temporary (or,
    for an address with a control character, permanent) result."""
    if _CONTROL.search(recipient):
        return LocalResult.make(553, "5.1.3", "recipient address has a control character")
    if _CONTROL.search(sender):
        return LocalResult.make(553, "5.1.7", "sender address has a control character")
    data = bytes(content)
    eol = b"\n" if lf else b"\r\n"
    if lf:
        data = data.replace(b"\r\n", b"\n")
    data = _header_lines(sender, recipient, eol) + data

    step = "create maildir"
    tmp_path: str | None = None
    try:
        ensure_maildir(maildir)
        tmp_dir = os.path.join(maildir, "tmp")
        step = "create file in tmp/"
        fd = -1
        for _ in range(_NAME_TRIES):
            name = unique_name(hostname)
            tmp_path = os.path.join(tmp_dir, name)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                break
            except FileExistsError:
                tmp_path = None
        if fd < 0:
            raise FileExistsError(errno.EEXIST, "no free name in tmp/", tmp_dir)
        try:
            step = "write file in tmp/"
            _write_all(fd, data)
            step = "fsync file in tmp/"
            os.fsync(fd)
        finally:
            os.close(fd)
        step = "link file into new/"
        new_dir = os.path.join(maildir, "new")
        final = _place(tmp_path, new_dir, name, hostname)
        renamed = not os.path.lexists(tmp_path)
        try:
            step = "fsync new/"
            _fsync_dir(new_dir)
        except OSError:
            # Not known to be durable: take it back, so that the retry this
            # result causes cannot deliver the message twice.
            try:
                if renamed:
                    os.rename(final, tmp_path)
                else:
                    os.unlink(final)
            except OSError as e2:
                log.warn("{path}: delivered but the directory fsync failed and the file "
                         "cannot be taken back: {why}", path=final, why=e2.strerror or e2)
                tmp_path = None
                return LocalResult.make(250, "2.0.0", f"delivered to maildir as {final}")
            raise
        if not renamed:
            try:
                os.unlink(tmp_path)
            except OSError as e:
                log.warn("{path}: cannot remove after delivery: {why}", path=tmp_path,
                         why=e.strerror or e)
        tmp_path = None
        return LocalResult.make(250, "2.0.0", f"delivered to maildir as {final}")
    except OSError as e:
        return _os_error(e, maildir, step)
    finally:
        if tmp_path is not None:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
