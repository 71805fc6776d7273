#!/usr/bin/env python3
"""How long the queue runner's due read takes with a backlog.

    .venv/bin/python bench/due_read.py [N ...]      (default: 500 3000 20000)

Fills a fresh SQLite spool with N queued one-recipient messages and prints
the mean time of mta.spool.ops.due_recipients for 40 rows (what a pass with
ten free slots reads), with no domain left out and with one left out that
has none of the backlog.  Run it at two revisions (``git stash``, a
checkout) to compare; the machine's noise matters little here.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet.task import Clock  # noqa: E402

from mta.message import InboundMessage, Recipient, new_queue_id  # noqa: E402
from mta.spool import Spool, ops  # noqa: E402


def message(i: int) -> InboundMessage:
    now = time.time()
    headers = b"Subject: backlog\r\n\r\n"
    body = b"x" * 1000 + b"\r\n"
    return InboundMessage(new_queue_id(now), "a@origin.test", [Recipient(f"u{i}@a.test")],
                          headers, body, now, "127.0.0.1", "client.test", "ESMTP",
                          len(headers) + len(body))


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [500, 3000, 20000]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            spool = Spool(f"sqlite:///{tmp}/spool.sqlite", node="bench", lease=300.0,
                          reactor=Clock())
            spool.open()
            with spool.engine.begin() as conn:
                for k in range(0, n, 500):
                    ops.insert_messages(conn, [message(k + i) for i in range(min(500, n - k))])
            now = time.time() + 1
            with spool.engine.begin() as conn:
                for skip in ((), ("elsewhere.test",)):
                    ops.due_recipients(conn, now, 40, "bench", skip)
                    reps = 50
                    t = time.perf_counter()
                    for _ in range(reps):
                        rows = ops.due_recipients(conn, now, 40, "bench", skip)
                    ms = (time.perf_counter() - t) / reps * 1e3
                    print(f"{n:6d} queued, skip {len(skip)} domain(s): {len(rows)} rows "
                          f"in {ms:.3f} ms per due read")
            spool.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
