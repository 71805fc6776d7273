"""The spool as a Twisted service: writer thread up before the listeners,
down (after draining every submitted write) after them."""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, threads

from . import Spool


class SpoolService(service.Service):
    def __init__(self, spool: Spool):
        self.spool = spool

    def startService(self) -> None:
        super().startService()
        self.spool.start()

    def stopService(self) -> defer.Deferred:
        # Drain the writer off the reactor thread, so the reactor keeps running
        # and the sessions waiting on those commits still get their 250.
        super().stopService()
        return threads.deferToThread(self.spool.stop)
