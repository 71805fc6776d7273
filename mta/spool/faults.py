"""Spool failures: the spool's exceptions, their one-line text, and how a
failure that repeats is logged.

A spool that fails usually fails the same way many times a second (a full
disk refuses every claim of the queue runner and every new message), so a
traceback per failure buries everything else in the log.
:class:`RepeatedFailures` logs an episode of failures of one operation in a
few lines: each distinct failure (its :func:`describe` text) once; its
repeats within a window counted and summarised in one line at the end of
the window ("... repeated 118 times in the last 60 s"); and the first
success after failures once.  The spool's writer and the queue runner's
spool operations (recovery at start, queue runs, recording results) use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger, LogLevel

__all__ = ["RepeatedFailures", "SpoolError", "SpoolWriteError", "describe"]


class SpoolError(Exception):
    """The spool cannot be opened or used."""


class SpoolWriteError(SpoolError):
    """A write that was not done (nothing of it is in the spool, or nothing
    a restart would find).  ``str()`` is one line; ``__cause__`` is the
    original exception, when there is one."""


def describe(exc: BaseException) -> str:
    """A spool failure in one line, for logs and command-line errors: a
    :class:`SpoolError`'s own text (already one line that says what
    failed); else ``Type: message`` -- for a SQLAlchemy error, of the
    driver's exception it wraps (its ``str()`` adds the SQL statement)."""
    if isinstance(exc, SpoolError):
        return " ".join(str(exc).split()) or type(exc).__name__
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
    """One operation's failures, a few log lines an episode.

    *what* names the operation ("spool write", "recording delivery
    results"), *consequence* what its failure means ("tried again at the
    next queue run"; optional).  The lines, at *level* (the recovery at
    info)::

        {what} failed ({where}): {error}; {consequence}
        {what} failed: {error} (repeated {n} times in the last {s} s)
        {what} succeeded again after {n} failure(s) in {s} s

    Called on the reactor thread; *clock* gives ``seconds()`` and
    ``callLater()`` (the reactor, or a ``task.Clock`` in tests).  At most
    ``MAX_ERRORS`` distinct errors are followed at once; others are counted
    in the episode only.  :meth:`close` at stop cancels the timers.
    """

    MAX_ERRORS = 20

    def __init__(self, log: Logger, clock: Any, *, what: str, consequence: str = "",
                 window: float = 60.0, level: LogLevel = LogLevel.error) -> None:
        self.log = log
        self.clock = clock
        self.what = what
        self.consequence = consequence
        self.window = window
        self.level = level
        self._open: dict[str, _Open] = {}
        self.failures = 0        # since the last success
        self._since = 0.0        # when the first of them happened

    def failed(self, error: str, where: str = "") -> None:
        """One failure, *error* (see :func:`describe`), of the operation on
        *where* (a queue id, a function name; optional)."""
        now = self.clock.seconds()
        if not self.failures:
            self._since = now
        self.failures += 1
        entry = self._open.get(error)
        if entry is not None and entry.repeats == 0 and now - entry.start >= self.window:
            entry = None          # quiet for a whole window: a new occurrence
        if entry is None:
            if error not in self._open and len(self._open) >= self.MAX_ERRORS:
                return
            self.log.emit(self.level, "{what} failed{where}: {error}{consequence}",
                          what=self.what, where=f" ({where})" if where else "", error=error,
                          consequence=f"; {self.consequence}" if self.consequence else "")
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
            self.log.emit(self.level,
                          "{what} failed: {error} (repeated {n} times in the last {seconds} s)",
                          what=self.what, error=error, n=entry.repeats,
                          seconds=max(1, round(now - entry.start)))

    def succeeded(self) -> None:
        """The operation went through: summarise what is pending, and say
        that it works again (only after failures)."""
        if not self.failures:
            return
        self.close()
        self.log.info("{what} succeeded again after {n} failure(s) in {seconds} s",
                      what=self.what, n=self.failures,
                      seconds=round(self.clock.seconds() - self._since))
        self.failures = 0

    def close(self) -> None:
        """Stop (or recovery): log what is pending, cancel the timers."""
        now = self.clock.seconds()
        for error, entry in self._open.items():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            self._log_repeats(error, entry, now)
        self._open.clear()
