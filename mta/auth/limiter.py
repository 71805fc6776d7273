"""Slow down, then refuse, password guessing from one address.

Each failed AUTH from an address counts one failure.  The ``535`` for the
n-th failure is held back ``delay * 2**(n-1)`` seconds (at most 16 times
``delay``); once an address has ``max_failures`` failures, AUTH from it is
refused (``454 4.7.0``) without checking anything.  Checks still running
count as possible failures, so a burst of parallel attempts cannot get
past the limit before the first verdicts are in.  An address's failures
are forgotten ``lockout`` seconds after its last one — that is the decay,
and how long a refusal lasts.  IPv6 clients are counted per /64, since one
host usually owns a whole /64.  The table is bounded: past ``max_entries``
addresses the stalest are dropped first.
"""
from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["FAILURE_DELAY", "LOCKOUT", "MAX_FAILURES", "FailureLimiter"]

# The defaults, also those of [auth] failure_delay, max_failures and lockout (mta.config).
FAILURE_DELAY = 1.0
MAX_FAILURES = 5
LOCKOUT = 900.0


class FailureLimiter:
    def __init__(self, *, clock: Any, delay: float = FAILURE_DELAY,
                 max_failures: int = MAX_FAILURES, lockout: float = LOCKOUT,
                 max_entries: int = 10000):
        self.clock = clock
        self.delay = delay
        self.max_failures = max_failures
        self.lockout = lockout
        self.max_entries = max_entries
        self._table: dict[str, tuple[int, float]] = {}   # key -> (failures, time of last)
        self._running: dict[str, int] = {}                # key -> checks in progress

    @staticmethod
    def key(client_ip: str) -> str:
        try:
            addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return client_ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return str(addr)

    def failures(self, client_ip: str) -> int:
        entry = self._table.get(self.key(client_ip))
        if entry is None:
            return 0
        if self.clock.seconds() - entry[1] >= self.lockout:
            del self._table[self.key(client_ip)]
            return 0
        return entry[0]

    def refused(self, client_ip: str) -> bool:
        """Should AUTH from this address be refused outright?"""
        if self.max_failures <= 0:
            return False
        running = self._running.get(self.key(client_ip), 0)
        return self.failures(client_ip) + running >= self.max_failures

    def started(self, client_ip: str) -> None:
        """A credential check from this address begins."""
        k = self.key(client_ip)
        self._running[k] = self._running.get(k, 0) + 1

    def finished(self, client_ip: str) -> None:
        """That check is over (call before :meth:`failed`)."""
        k = self.key(client_ip)
        n = self._running.get(k, 0) - 1
        if n > 0:
            self._running[k] = n
        else:
            self._running.pop(k, None)

    def failed(self, client_ip: str) -> float:
        """Count a failure; return how long to hold back the 535."""
        n = self.failures(client_ip) + 1
        k = self.key(client_ip)
        self._table.pop(k, None)           # re-insert: dict order = staleness order
        self._table[k] = (n, self.clock.seconds())
        if len(self._table) > self.max_entries:
            self._prune()
        return self.delay * min(2 ** (n - 1), 16)

    def _prune(self) -> None:
        now = self.clock.seconds()
        for k in [k for k, (_, t) in self._table.items() if now - t >= self.lockout]:
            del self._table[k]
        while len(self._table) > self.max_entries:
            del self._table[next(iter(self._table))]

    def __len__(self) -> int:
        return len(self._table)
