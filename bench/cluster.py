#!/usr/bin/env python3
"""Cluster benchmark: accepted and delivered messages/s with 1, 2 and 3 mta
nodes on one PostgreSQL spool, against one node on SQLite, in the same run.

    .venv/bin/python bench/cluster.py [--count N] [--sessions S] [--reps R]

All on loopback: one ``smtp-sink`` is the next hop of every node
(``[relay] smarthost``; ``[dns] nameservers`` pinned to a refusing loopback
port); a private PostgreSQL (tests/pg.py: ``initdb`` + ``pg_ctl`` into a
temporary directory, a Unix socket, a fresh database per run; durability as
the tests set it: ``fsync = off``, so these numbers are the spool's code
path, not a disk's).  For each case and repetition: fresh daemons, one
``smtp-source -s S/N -m COUNT/N -l 1024`` per node, all at once; the clock
runs from their start until the sink has counted COUNT more messages and
the spool holds none.  Delivered messages/s = COUNT / that time.  A small
warm-up first (not timed).  Needs Postfix's smtp-source and smtp-sink
(tests/setup-deps) and Debian's postgresql.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from run import (SMTP_SINK, SMTP_SOURCE, TWISTD, Sink, free_port, run_smtp_source,  # noqa: E402
                 stop_process, wait_for_port)
from pg import PostgresServer, server_bindir  # noqa: E402

import subprocess  # noqa: E402


class Node:
    def __init__(self, workdir: Path, url: str, sink_port: int, dead_port: int, name: str):
        workdir.mkdir(parents=True)
        self.dir = workdir
        self.port = free_port()
        self.log = workdir / "twistd.log"
        self.config = workdir / "mta.toml"
        self.config.write_text(
            "[server]\n"
            f'hostname = "{name}.bench.test"\n'
            f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            "max_connections = 1000\nmax_connections_per_client = 1000\n"
            "[policy]\n"
            'relay_networks = ["127.0.0.0/8"]\nrelay_domains = ["example.test"]\n'
            f'[spool]\nurl = "{url}"\n'
            f'[relay]\nsmarthost = "127.0.0.1:{sink_port}"\n'
            f'[dns]\nnameservers = ["127.0.0.1:{dead_port}"]\n')
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "--logfile", str(self.log), "mta",
             "--config", str(self.config)], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 30, self.proc)

    def stop(self) -> None:
        stop_process(self.proc, "mta")


def queue_count(url: str):
    from sqlalchemy import create_engine, text
    engine = create_engine(url)

    def count() -> int:
        with engine.connect() as c:
            return c.execute(text("SELECT COUNT(*) FROM messages")).scalar_one()
    return engine, count


def run_case(kind: str, nodes: int, args, sink: Sink, pg: PostgresServer | None, tmp: Path,
             rep: int, dead_port: int) -> float:
    work = tmp / f"{kind}-{nodes}-r{rep}"
    if kind == "sqlite":
        url = f"sqlite:///{work}/spool/mta.sqlite"
    else:
        assert pg is not None
        url = pg.create_database()
    daemons = [Node(work / f"node{i}", url, sink.port, dead_port, f"n{i}") for i in range(nodes)]
    try:
        for d in daemons:
            d.start()
        engine, count = queue_count(url)
        try:
            def drain(target: int, t0: float, threads: list[threading.Thread]) -> float:
                deadline = time.monotonic() + args.timeout
                while not sink.wait_messages(target, 0.25):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{kind} x{nodes}: sink has {sink.messages} of {target}")
                while count() != 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{kind} x{nodes}: queue not empty")
                    time.sleep(0.005)
                took = time.perf_counter() - t0
                for t in threads:
                    t.join()
                return took

            def sources(total: int, sessions: int) -> list[threading.Thread]:
                out = []
                for i, d in enumerate(daemons):
                    n = total // nodes + (1 if i < total % nodes else 0)
                    s = max(1, sessions // nodes)
                    t = threading.Thread(target=run_smtp_source,
                                         args=(d.port, s, n, 1024, False, args.timeout),
                                         daemon=True)
                    out.append(t)
                for t in out:
                    t.start()
                return out
            base = sink.messages
            drain(base + args.warmup, time.perf_counter(), sources(args.warmup, nodes))
            base = sink.messages
            t0 = time.perf_counter()
            seconds = drain(base + args.count, t0, sources(args.count, args.sessions))
        finally:
            engine.dispose()
    finally:
        for d in daemons:
            d.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return args.count / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="messages per run (default 2000)")
    p.add_argument("--sessions", type=int, default=24, help="sessions in all (default 24)")
    p.add_argument("--reps", type=int, default=2, help="repetitions (default 2)")
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="keep the daemons' directories")
    args = p.parse_args()
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit(f"bench: {tool} not found: run tests/setup-deps")
    bindir = server_bindir()
    if bindir is None:
        sys.exit("bench: PostgreSQL not found: run tests/setup-deps")
    tmp = Path(tempfile.mkdtemp(prefix="mta-cluster-bench-"))
    pg = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="mta-pg-")))
    sink = None
    results: dict[tuple[str, int], list[float]] = {}
    try:
        pg.init()
        pg.start()
        sink = Sink(free_port())
        dead = free_port()
        cases = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3)]
        for rep in range(args.reps):
            for kind, n in (cases if rep % 2 == 0 else list(reversed(cases))):
                rate = run_case(kind, n, args, sink, pg, tmp, rep, dead)
                results.setdefault((kind, n), []).append(rate)
                print(f"rep {rep}: {kind} x{n}: {rate:.0f} msg/s", flush=True)
    finally:
        if sink is not None:
            sink.stop()
        pg.stop("immediate")
        shutil.rmtree(pg.base, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.count} messages of 1 KB, {args.sessions} sessions in all, accepted and "
          f"delivered to smtp-sink; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'spool':<12} {'nodes':>5} {'msg/s (each run)':>24} {'median':>8}")
    for (kind, n), rates in results.items():
        each = " / ".join(f"{r:.0f}" for r in rates)
        print(f"{kind:<12} {n:>5} {each:>24} {statistics.median(rates):>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
