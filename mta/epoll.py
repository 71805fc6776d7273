"""The epoll reactor's poll, without Twisted's per-event logging context.

For every readable or writable socket, Twisted's ``EPollReactor.doPoll``
calls the handler through ``twisted.python.log.callWithLogger``: it asks
the connection for its ``logPrefix()`` and pushes it as the legacy
``system`` context around the call (a dict copy and a push and pop on a
thread-local stack), so that an old-style ``log.msg`` from inside would be
tagged with it.  Nothing in mta logs that way (its loggers are
``twisted.logger.Logger`` with a namespace), yet that wrapping cost ~4 % of
the CPU per message -- some twenty socket events each -- measured with
``make bench --e2e``.

:func:`streamline` gives the reactor a ``doIteration`` that polls as
Twisted's does and calls each handler directly; an exception that escapes
one is logged (``log.err``) as callWithLogger would have, without the
``system`` tag.  It does so only for Twisted's own EPollReactor, whose
attributes it uses, and leaves any other reactor alone.
"""
from __future__ import annotations

import errno
from typing import Any

from twisted.python import log

__all__ = ["streamline"]


def streamline(reactor: Any) -> bool:
    """Give *reactor* the direct poll; False (nothing changed) unless it is
    Twisted's EPollReactor."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:          # not on Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    handle = reactor._doReadOrWrite

    def do_poll(timeout: float | None) -> None:
        # Looked up each time: a worker forked from a running supervisor
        # gets a poller of its own (mta.workers), and keeps this method.
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(-1 if timeout is None else timeout,
                                          len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue         # removed by the handler of an earlier event
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise            # as callWithLogger does
            except BaseException:
                log.err(None, "unhandled error in a socket handler")

    reactor.doIteration = do_poll
    return True
