"""Spool failures as one log line each.

A spool that fails usually fails the same way many times a second (a full
disk refuses every claim of the queue runner and every new message), so a
traceback per failure buries everything else in the log.  Each distinct
failure (exception type and message) is logged once, in one line; its
repeats within a window are counted and summarised in one line at the end
of the window ("... repeated 118 times in the last 60 s"), and the first
write that succeeds again says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger


def describe(exc: BaseException) -> str:
    """``Type: message`` of *exc* in one line.  For a SQLAlchemy error, the
    driver's exception it wraps (its ``str()`` adds the SQL statement)."""
    orig = getattr(exc, "orig", None)
    e = orig if isinstance(orig, BaseException) else exc
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclass
class _Open:
    start: float            # when the current window began
    repeats: int = 0        # occurrences since the last line logged for it
    timer: Any = None       # IDelayedCall of the summary, while repeats are pending


class RepeatedFailures:
    """Logs failures one line each, repeats summarised per *window* seconds.
    Called on the reactor thread; *clock* gives ``seconds()`` and
    ``callLater()`` (the reactor, or a ``task.Clock`` in tests)."""

    def __init__(self, log: Logger, clock: Any, *, window: float = 60.0,
                 what: str = "spool write failed") -> None:
        self.log = log
        self.clock = clock
        self.window = window
        self.what = what
        self._open: dict[str, _Open] = {}
        self.failures = 0        # since the last success

    def failed(self, where: str, error: str) -> None:
        """One failure of the operation *where* (a queue id, a function
        name) with *error* (see :func:`describe`)."""
        self.failures += 1
        now = self.clock.seconds()
        entry = self._open.get(error)
        if entry is not None and entry.repeats == 0 and now - entry.start >= self.window:
            entry = None          # quiet for a whole window: a new occurrence
        if entry is None:
            self.log.error("{what} ({where}): {error}", what=self.what, where=where, error=error)
            self._open[error] = _Open(start=now)
            return
        entry.repeats += 1
        if entry.timer is None:
            entry.timer = self.clock.callLater(max(0.0, entry.start + self.window - now),
                                               self._summarise, error)

    def _summarise(self, error: str) -> None:
        entry = self._open.get(error)
        if entry is None:
            return
        now = self.clock.seconds()
        entry.timer = None
        self._log_repeats(error, entry, now)
        entry.start = now
        entry.repeats = 0

    def _log_repeats(self, error: str, entry: _Open, now: float) -> None:
        if entry.repeats:
            self.log.error("{what}: {error} (repeated {n} times in the last {seconds} s)",
                           what=self.what, error=error, n=entry.repeats,
                           seconds=max(1, round(now - entry.start)))

    def succeeded(self) -> None:
        """A write went through: summarise what is pending, and say that the
        spool works again (only after failures)."""
        if not self.failures:
            return
        self.close()
        self.log.info("spool writes succeed again after {n} failure(s)", n=self.failures)
        self.failures = 0

    def close(self) -> None:
        """Stop (or recovery): log what is pending, cancel the timers."""
        now = self.clock.seconds()
        for error, entry in self._open.items():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            self._log_repeats(error, entry, now)
        self._open.clear()
