"""The daemon's settings of Python's cyclic garbage collector.

Almost everything the daemon allocates per message (Deferreds, replies,
rows, the message itself) is freed by reference counting the moment it is
done with; the cycle collector finds little.  Yet with CPython's default
thresholds (a collection of the youngest generation every 700 net
allocations) it ran ~470 times and went through the whole heap -- Twisted,
SQLAlchemy, the configuration: some 80 MB -- four times in a 6,000-message
``make bench --e2e`` run, ~0.2 s of one worker's CPU: 4-5 % of the CPU per
message.

:func:`settle`, when the service tree starts (in each worker of
``[server] workers``, and in the supervisor just before it forks them),
collects once, moves what has survived start-up into the permanent
generation (``gc.freeze``: never traversed again, and its pages stay shared
with the supervisor), and collects the youngest generation every 20,000 net
allocations instead: in that run the collector then never ran.  Cyclic
garbage made later is still collected, only later; what was frozen is
never collected (start-up objects, which live as long as the process).
"""
from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD = 20_000   # net allocations between collections of the youngest generation


def settle() -> None:
    """Collect, freeze what is left, and raise the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
