"""JSON logs for twistd: ``twistd --logger mta.logging.json_observer mta ...``
writes one JSON object per log event and line (JSON Lines) instead of the
text log.

twistd calls the factory without arguments, so the destination comes from
the environment: ``MTA_LOG_JSON=/var/log/mta/mta.json`` (appended to; reopen
it with SIGUSR1 after rotating it away, or use copytruncate), or standard
output when unset or ``-`` (for ``twistd -n`` under systemd or a container
runtime).

Each object is Twisted's own serialisation of the event
(``twisted.logger.eventAsJSON``: ``log_namespace``, ``log_level``,
``log_time``, ``log_format`` and every field, such as ``queue_id``,
``client``, ``rcpt``, ``status``), plus ``text``: the formatted message as
the text log would show it, and ``level`` (``info``, ``warn``, ...).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import IO, Any

from twisted.logger import (FileLogObserver, FilteringLogObserver, ILogObserver,
                            LogPublisher, PredicateResult, eventAsJSON, formatEvent,
                            globalLogPublisher)

ENV = "MTA_LOG_JSON"


def _json_line(event: dict[str, Any]) -> str:
    event = dict(event)
    try:
        event["text"] = formatEvent(event)
    except Exception:     # formatEvent does not raise, but be safe: a log line must not
        event["text"] = str(event.get("log_format", ""))
    level = event.get("log_level")
    if level is not None:
        event["level"] = getattr(level, "name", str(level))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            event["traceback"] = failure.getTraceback()
        except Exception:
            pass
    return eventAsJSON(event) + "\n"


class _ReopeningFile:
    """A log file opened for appending, reopened after SIGUSR1 (rotation):
    the signal only sets a flag, the next write reopens."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] = self._open()
        self.reopen_wanted = False

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> None:
        with self._lock:
            if self.reopen_wanted:
                self.reopen_wanted = False
                try:
                    new = self._open()
                except OSError:
                    pass
                else:
                    self._file.close()
                    self._file = new
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """The log observer factory for ``twistd --logger``."""
    if out is None:
        target = os.environ.get(ENV, "-")
        if target in ("", "-"):
            out = sys.stdout
        else:
            out = _ReopeningFile(target)  # type: ignore[assignment]
            _reopen_on_usr1(out)          # type: ignore[arg-type]
    return FileLogObserver(out, _json_line)


def _reopen_on_usr1(f: _ReopeningFile) -> None:
    try:
        previous = signal.getsignal(signal.SIGUSR1)
    except (AttributeError, ValueError):
        return
    if previous not in (None, signal.SIG_DFL):
        return

    def handler(signum: int, frame: Any) -> None:
        f.reopen_wanted = True
    try:
        signal.signal(signal.SIGUSR1, handler)
    except ValueError:   # not the main thread
        pass


# Twisted's own lines for each DNS query: twisted.names.client.Resolver opens
# a UDP port per query, and twisted.internet.udp logs its opening and
# closing unconditionally (and the protocol its start and stop).
_DNS_CHATTER = re.compile(
    r"DNSDatagramProtocol starting on \d+"
    r"|\(UDP Port \d+ Closed\)"
    r"|(?:Starting|Stopping) protocol <twisted\.names\.dns\.DNSDatagramProtocol object at 0x[0-9a-fA-F]+>")


def not_dns_chatter(event: dict[str, Any]) -> PredicateResult:
    """A log filter predicate: drop the four lines Twisted logs per DNS query."""
    if event.get("log_namespace") == "log_legacy":
        text = event.get("log_text")
        if text is None:
            text = " ".join(str(m) for m in event.get("message", ()))
        if _DNS_CHATTER.fullmatch(str(text)):
            return PredicateResult.no
    return PredicateResult.maybe


def quiet_dns_chatter(publisher: LogPublisher = globalLogPublisher) -> bool:
    """Wrap every observer of *publisher* (those twistd installed: the text
    log, syslog or ``--logger``) in a filter that drops Twisted's per-query
    DNS lines.  Call once logging has begun (in a service's startService).
    Returns False when the publisher's observers cannot be found (a Twisted
    that changed its internals): then nothing is filtered."""
    observers = getattr(publisher, "_observers", None)
    if not isinstance(observers, list):
        return False
    for observer in list(observers):
        if isinstance(observer, _Quiet):
            continue
        publisher.removeObserver(observer)
        publisher.addObserver(_Quiet(observer))
    return True


class _Quiet(FilteringLogObserver):
    def __init__(self, observer: ILogObserver) -> None:
        super().__init__(observer, [not_dns_chatter])
