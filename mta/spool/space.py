"""The free-space reserve of the spool's file system.

New mail is refused (``452 4.3.1``, at MAIL) before the disk is full, so
that what is already queued can still be delivered: claiming work and
recording results are writes too, and a spool that fills its own disk
cannot drain.  As in Postfix (``queue_minfree``, and 1.5 x
``message_size_limit``), a new message is taken only while the free space
is at least::

    max(queue_minfree + SIZE, 1.5 * max(max_message_size, SIZE))

(SIZE is the MAIL SIZE= value, 0 when the client gave none.)
"""
from __future__ import annotations

import os
from typing import Any, Callable

from twisted.logger import Logger

log = Logger(namespace="mta.spool")

RESERVE_FACTOR = 1.5


class FreeSpace:
    """``fits(size)``: whether a message of *size* octets (0: unknown) may be
    taken while keeping the reserve.  ``statvfs`` of the spool's directory
    is read at most once per *cache* seconds, so the check stays cheap on the
    reactor thread.  A file system that cannot be read counts as having room
    (the write itself will tell)."""

    def __init__(self, directory: str, *, minfree: int, max_message_size: int,
                 clock: Callable[[], float], cache: float = 1.0,
                 statvfs: Callable[[str], Any] = os.statvfs) -> None:
        self.directory = directory
        self.minfree = minfree
        self.max_message_size = max_message_size
        self.clock = clock
        self.cache = cache
        self._statvfs = statvfs
        self._free: int | None = None
        self._read_at: float | None = None
        self._low = False

    @property
    def floor(self) -> int:
        """The free space below which no new mail is taken (SIZE unknown)."""
        return self.required(0)

    def required(self, size: int) -> int:
        return int(max(self.minfree + size,
                       RESERVE_FACTOR * max(self.max_message_size, size)))

    def free(self) -> int | None:
        """Octets available on the spool's file system (cached), or None."""
        now = self.clock()
        if self._read_at is None or not 0 <= now - self._read_at < self.cache:
            self._read_at = now
            self._free = self._read()
        return self._free

    def _read(self) -> int | None:
        path = self.directory
        while True:          # a directory removed under us: its parent's file system
            try:
                st = self._statvfs(path)
            except FileNotFoundError:
                parent = os.path.dirname(path)
                if not parent or parent == path:
                    return None
                path = parent
                continue
            except OSError:
                return None
            return int(st.f_bavail) * int(st.f_frsize)

    def fits(self, size: int = 0) -> bool:
        free = self.free()
        if free is None:
            return True
        ok = free >= self.required(size)
        floor_ok = free >= self.floor
        if floor_ok == self._low:      # crossing the floor: say so once
            self._low = not floor_ok
            if self._low:
                log.warn("spool file system {dir}: {free} bytes free, below the reserve of "
                         "{floor} bytes: new mail is refused (452 4.3.1) until there is room",
                         dir=self.directory, free=free, floor=self.floor)
            else:
                log.info("spool file system {dir}: {free} bytes free again (reserve "
                         "{floor} bytes): new mail is taken again", dir=self.directory,
                         free=free, floor=self.floor)
        return ok

    __call__ = fits
