"""The spool as a Twisted service: writer thread up before the listeners,
down (after draining every submitted write) after them."""
from __future__ import annotations

from twisted.application import service

from . import Spool


class SpoolService(service.Service):
    def __init__(self, spool: Spool):
        self.spool = spool

    def startService(self) -> None:
        super().startService()
        self.spool.start()

    def stopService(self) -> None:
        super().stopService()
        self.spool.stop()
