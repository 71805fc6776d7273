"""The users file: one ``user:hash`` line per user, optionally ``user:hash:cram``.

::

    # comments and blank lines are kept as they are
    alice@example.test:$scrypt$n=16384,r=8,p=1$...$...
    branch:$scrypt$n=16384,r=8,p=1$...$...:{CRAM-MD5}0123...cdef

The second field is the scrypt hash every user has (AUTH PLAIN and LOGIN
check it).  The optional third field, written by ``mta passwd add
--cram-md5``, is the user's CRAM-MD5 secret in the form of Dovecot's
``CRAM-MD5`` scheme (see :mod:`mta.auth.passwords`); only users that have
one can use AUTH CRAM-MD5.  Files without third fields are read as before.

User names are UTF-8 without ``:``, white space or control characters and
are compared exactly (case matters).  The daemon reads the file at startup
and again whenever its modification time, size or inode changes (one
``stat()`` per AUTH, done on the worker thread, and one per EHLO, to know
whether to offer CRAM-MD5); a missing file means no
users.  A malformed line is skipped and reported, never fatal, so one typo
does not lock everybody out.

``mta passwd`` changes the file through :func:`edit_users_file`: under an
exclusive lock (flock) on the file's directory, it writes a temporary file in the same
directory, fsyncs it, and renames it over the old one, so readers see the
old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .passwords import HashError, check_cram_md5_secret, check_hash

__all__ = ["UsersFileError", "UsersFile", "Entry", "valid_username", "parse_lines",
           "edit_users_file", "read_users_file"]

MAX_USERNAME = 256


class UsersFileError(Exception):
    """The users file cannot be read or written; ``str()`` is one line."""


def valid_username(name: str) -> str | None:
    """None if *name* can be a user name, else why not."""
    if not name:
        return "empty user name"
    if len(name) > MAX_USERNAME:
        return f"user name longer than {MAX_USERNAME} characters"
    if ":" in name:
        return "user name contains ':'"
    if name.startswith("#"):
        return "user name starts with '#'"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "user name contains white space or control characters"
    return None


@dataclass
class Entry:
    """One line of the file: a user (name, hash and maybe a CRAM-MD5 secret)
    or anything else (kept verbatim)."""
    line: str
    user: str | None = None
    hash: str | None = None
    cram: str | None = None

    @classmethod
    def for_user(cls, user: str, hashed: str, cram: str | None = None) -> "Entry":
        """The entry (and its line) for a user."""
        line = f"{user}:{hashed}" if cram is None else f"{user}:{hashed}:{cram}"
        return cls(line, user, hashed, cram)


def parse_lines(text: str, source: str) -> tuple[list[Entry], list[str]]:
    """Entries in file order, and one-line problems ``source:lineno: message``."""
    entries: list[Entry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            entries.append(Entry(line))
            continue
        user, sep, rest = line.partition(":")
        hashed, sep2, cram_field = rest.partition(":")
        hashed = hashed.strip()
        cram = cram_field.strip() if sep2 else None
        why = valid_username(user) if sep else "expected user:hash"
        if why is None:
            try:
                check_hash(hashed)
            except HashError as e:
                why = f"user {user!r}: bad hash: {e}"
        if why is None and cram is not None:
            try:
                check_cram_md5_secret(cram)
            except HashError as e:
                why = f"user {user!r}: bad CRAM-MD5 secret: {e}"
        if why is None and user in seen:
            why = f"user {user!r} listed again (the first line counts)"
        if why is not None:
            problems.append(f"{source}:{lineno}: {why}")
            entries.append(Entry(line))
            continue
        seen.add(user)
        entries.append(Entry(line, user, hashed, cram))
    return entries, problems


def _reason(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)


def read_users_file(path: str, *, missing_ok: bool = True) -> tuple[list[Entry], list[str]]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if missing_ok:
            return [], []
        raise UsersFileError(f"{path}: no such file") from None
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read file: {_reason(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsersFileError(f"{path}: not valid UTF-8: {e}") from None
    return parse_lines(text, path)


class UsersFile:
    """The daemon's view of the users file, re-read when it changes.

    :meth:`lookup` may be called from any thread.  ``on_problem`` is told
    about unreadable files and malformed lines (once per change of the file).
    """

    def __init__(self, path: str, on_problem: Callable[[str], None] | None = None):
        self.path = path
        self._on_problem = on_problem or (lambda message: None)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._cram: dict[str, str] = {}
        self.loads = 0

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UsersFileError(f"{self.path}: cannot stat file: {_reason(e)}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> list[str]:
        """(Re)read the file now; return the problems found.  Raises
        UsersFileError if the file exists but cannot be read."""
        with self._lock:
            return self._load(self._current_stamp())

    def _load(self, stamp: tuple[int, int, int] | None) -> list[str]:
        entries, problems = read_users_file(self.path)
        self._users = {e.user: e.hash for e in entries if e.user is not None and e.hash}
        self._cram = {e.user: e.cram for e in entries if e.user is not None and e.cram}
        self._stamp = stamp
        self.loads += 1
        for p in problems:
            self._on_problem(p)
        return problems

    def refresh(self) -> None:
        """Re-read the file if it changed since it was last read."""
        try:
            stamp = self._current_stamp()
        except UsersFileError as e:
            self._on_problem(str(e))
            return
        if stamp == self._stamp and self.loads:
            return
        with self._lock:
            if stamp == self._stamp and self.loads:
                return
            try:
                self._load(stamp)
            except UsersFileError as e:
                # Keep the users we had: a file being fixed by hand should
                # not lock everybody out in the meantime.
                self._stamp = stamp
                self._on_problem(str(e))

    def lookup(self, user: str) -> str | None:
        """The stored hash for *user*, or None (after a cheap freshness check)."""
        self.refresh()
        return self._users.get(user)

    def lookup_cram_md5(self, user: str) -> str | None:
        """The stored CRAM-MD5 secret for *user*, or None (after a cheap
        freshness check)."""
        self.refresh()
        return self._cram.get(user)

    def has_cram_md5(self) -> bool:
        """Does any user have a CRAM-MD5 secret (after a cheap freshness check)?"""
        self.refresh()
        return bool(self._cram)

    def __len__(self) -> int:
        return len(self._users)


# --------------------------------------------------------------------------- editing

@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # The lock is on the directory: the file itself is replaced by each
    # change, and a separate lock file would be litter.
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise UsersFileError(f"{directory}: cannot open directory: {_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o600
    except OSError as e:
        raise UsersFileError(f"{path}: {_reason(e)}") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise UsersFileError(f"{path}: cannot create a file in {directory}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsersFileError(f"{path}: cannot write file: {_reason(e)}") from None
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise UsersFileError(f"{directory}: fsync: {_reason(e)}") from None
    finally:
        os.close(dfd)


def edit_users_file(path: str, change: Callable[[list[Entry]], bool]) -> None:
    """Lock, read, let *change* edit the entries in place, and if it returns
    True write the file back atomically.  Malformed lines are kept as they were."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsersFileError(f"{path}: directory {directory} does not exist")
    with _locked(path):
        entries, _problems = read_users_file(path)
        if change(entries):
            _write_atomic(path, "".join(e.line + "\n" for e in entries))
