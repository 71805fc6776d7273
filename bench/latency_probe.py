#!/usr/bin/env python3
"""Where the time between the final dot and the ``250`` goes, for one sequential client.

    .venv/bin/python bench/latency_probe.py [--deliver] [--workers N] [-m 1000] [--size 1024]

Starts smtp-sink and an mta daemon whose methods are wrapped (from outside: mta/ is
not changed) to note, per message, on one clock (CLOCK_MONOTONIC, shared by every
process of the machine):

  sent      the client has sent the final ``.`` (Python client, TCP_NODELAY)
  recv      the reactor got the chunk with the dot (SMTPServer.dataReceived)
  put       the message was queued for the spool writer (Spool.store)
  batch     the writer thread began the group commit that holds it (Spool._write_batch)
  commit    that commit returned
  answer    the reactor ran the writer's answer (Spool._answer, via callFromThread)
  flush     the server handed the 250 to the transport (SMTPServer._flush)
  wire      it was written to the socket (at once, mta.smtp.eager; else by the
            reactor's FileDescriptor.doWrite)
  got       the client had the whole 250

and prints percentiles of every step, the composition of the commits that held a
message (stores alone, or with the delivery side's claim/record writes), and the
latency with and without such company.  ``--deliver`` relays everything to the sink
meanwhile (the "inbound while delivering" case); without it mta only accepts.
``--wrap OUT -- ARGV`` is the daemon side (used by the above).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes


# --------------------------------------------------------------------------- daemon side

def wrap(out: str, argv: list[str]) -> None:
    from twisted.internet import abstract, reactor
    from mta.smtp import server as smtp_server
    import mta.spool as spool_mod

    msgs: dict[str, dict] = {}      # queue id -> marks
    batches: list[dict] = []
    Spool = spool_mod.Spool
    SMTPServer = smtp_server.SMTPServer

    orig_recv = SMTPServer.dataReceived

    def dataReceived(self, data):
        self._probe_recv = now()
        return orig_recv(self, data)
    SMTPServer.dataReceived = dataReceived

    orig_store = Spool.store

    def store(self, msg):
        msgs[msg.queue_id] = {"put": now()}
        return orig_store(self, msg)
    Spool.store = store

    orig_store_proto = SMTPServer._store

    def _store(self, content):
        self._probe_dot = getattr(self, "_probe_recv", None)
        self._probe_eod = now()
        return orig_store_proto(self, content)
    SMTPServer._store = _store

    orig_wb = Spool._write_batch

    def _write_batch(self, batch, events):
        t = now()
        res = orig_wb(self, batch, events)
        t1 = now()
        kinds: dict[str, int] = {}
        for fn, arg, _d in batch:
            k = "store" if fn is None else getattr(fn, "__name__", str(fn))
            kinds[k] = kinds.get(k, 0) + 1
        b = {"start": t, "end": t1, "kinds": kinds}
        batches.append(b)
        for fn, arg, _d in batch:
            if fn is None and arg.queue_id in msgs:
                msgs[arg.queue_id].update(batch=t, commit=t1, bi=len(batches) - 1)
        return res
    Spool._write_batch = _write_batch

    orig_answer = Spool._answer

    def _answer(self, results, events=()):
        t = now()
        for _d, qid, _f in results:
            if isinstance(qid, str) and qid in msgs:
                msgs[qid]["answer"] = t
        return orig_answer(self, results, events)
    Spool._answer = _answer

    orig_stored = SMTPServer._stored

    def _stored(self, qid, msg):
        m = msgs.get(qid)
        if m is not None:
            m["recv"] = self._probe_dot
            m["eod"] = self._probe_eod
            self._probe_qid = qid
        r = orig_stored(self, qid, msg)
        if m is not None:
            m["stored_done"] = now()
        return r
    SMTPServer._stored = _stored

    orig_flush = SMTPServer._flush

    def _flush(self):
        qid = getattr(self, "_probe_qid", None)
        if qid is not None and self._out:
            msgs[qid]["flush"] = now()
            self._probe_qid = None
            self.transport._probe_wire = qid
        r = orig_flush(self)
        t = self.transport
        if qid is not None and getattr(t, "_probe_wire", None) == qid and not getattr(
                t, "_tempDataLen", 1) and not getattr(t, "dataBuffer", b"x"):
            msgs[qid]["wire"] = now()      # sent at once (mta.smtp.eager), no doWrite
            t._probe_wire = None
        return r
    SMTPServer._flush = _flush

    orig_dowrite = abstract.FileDescriptor.doWrite

    def doWrite(self):
        qid = getattr(self, "_probe_wire", None)
        if qid is not None:
            msgs[qid]["wire"] = now()
            self._probe_wire = None
        return orig_dowrite(self)
    abstract.FileDescriptor.doWrite = doWrite

    def dump():
        # One file per process: with [server] workers > 1 every forked
        # worker has these wrappers and its own marks.
        Path(f"{out}.{os.getpid()}").write_text(json.dumps({"messages": msgs, "batches": batches}))
    reactor.addSystemEventTrigger("after", "shutdown", dump)

    from twisted.scripts.twistd import run
    sys.argv = ["twistd", *argv]
    run()


# --------------------------------------------------------------------------- driver side

def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


STEPS = ("connect+banner", "EHLO", "MAIL", "RCPT", "DATA", "content+dot", "QUIT+close")


def client(port: int, count: int, size: int) -> tuple[list[tuple[str, float, float]], list[list[float]]]:
    """(queue id, dot sent, 250 received) per message, and the seconds of each of STEPS."""
    sys.path.insert(0, str(HERE))
    import run as bench
    out, steps = [], []
    for i in range(count):
        data = bench.message_bytes(i, size)
        t = [now()]
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rd = bench._Replies(sock)
        rd.expect(220, "banner")
        t.append(now())
        for cmd, code in ((b"EHLO client.bench.test\r\n", 250), (b"MAIL FROM:<a@example.test>\r\n", 250),
                          (b"RCPT TO:<b@example.test>\r\n", 250), (b"DATA\r\n", 354)):
            sock.sendall(cmd)
            rd.expect(code, cmd.decode().strip())
            t.append(now())
        sock.sendall(data)
        sent = now()
        code, reply = rd.read()
        got = now()
        t.append(got)
        if code != 250:
            raise SystemExit(f"refused: {reply!r}")
        qid = reply.decode().rsplit(" ", 1)[-1].strip()
        out.append((qid, sent, got))
        sock.sendall(b"QUIT\r\n")
        rd.read()
        sock.close()
        t.append(now())
        steps.append([b - a for a, b in zip(t, t[1:])])
    return out, steps


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--wrap":
        wrap(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deliver", action="store_true", help="relay to smtp-sink meanwhile")
    p.add_argument("-m", "--messages", type=int, default=1000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--json", help="write the raw marks here")
    p.add_argument("--workers", type=int, default=None,
                   help="[server] workers (default: the daemon's, 1); 0 = one per core, "
                        "split into accepting and delivering processes")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    import run as bench

    tmp = Path(tempfile.mkdtemp(prefix="mta-probe-"))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    sink = bench.Sink(bench.free_port()) if args.deliver else None
    guard = (bench._relay_dns(sink.port, dead_port) if sink else
             bench._relay_dns(dead_port, dead_port, "deliver = false\n"))
    marks_file = tmp / "marks.json"
    server_extra = f"workers = {args.workers}\n" if args.workers is not None else ""
    mta = bench.Mta(tmp, bench.free_port(), 10 << 20, [], None, guard, server_extra)
    # Run twistd through this file's wrapper.
    orig_start = bench.Mta.start

    def start(self):
        import subprocess
        argv = [sys.executable, str(Path(__file__).resolve()), "--wrap", str(marks_file), "--",
                "-n", "--pidfile=", "--logfile", str(self.logfile), "mta", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        bench.wait_for_port(self.port, 30, self.proc)
    bench.Mta.start = start
    try:
        mta.start()
        client(mta.port, args.warmup, args.size)
        load = os.getloadavg()[0]
        t0 = now()
        seen, csteps = client(mta.port, args.messages, args.size)
        wall = now() - t0
        if sink:
            sink.wait_messages(args.warmup + args.messages, 60)
    finally:
        mta.stop()
        if sink:
            sink.stop()
        bench.Mta.start = orig_start
    data: dict = {"messages": {}, "batches": []}
    for part in sorted(tmp.glob(marks_file.name + ".*")):     # one per process
        got = json.loads(part.read_text())
        base = len(data["batches"])
        for m in got["messages"].values():
            if "bi" in m:
                m["bi"] += base
        data["messages"].update(got["messages"])
        data["batches"].extend(got["batches"])
    if args.json:
        Path(args.json).write_text(json.dumps({"client": seen, **data}))
    msgs, batches = data["messages"], data["batches"]
    steps = [("sent", "recv", "client . -> reactor reads it"),
             ("recv", "put", "parse + build the message -> writer queue"),
             ("put", "batch", "waits for the writer (busy with an earlier commit)"),
             ("batch", "commit", "its group commit (SQL + fsync)"),
             ("commit", "answer", "writer -> reactor hand-off (callFromThread; reactor busy?)"),
             ("answer", "flush", "Deferred chain, log line, metrics, 250 into the buffer"),
             ("flush", "wire", "-> socket (at once, or the next reactor iteration)"),
             ("wire", "got", "loopback -> client has the 250"),
             ("sent", "got", "total: final dot -> 250, client side")]
    rows = []
    company = {"alone": [], "with delivery writes": []}
    for qid, sent, got in seen:
        m = msgs.get(qid)
        if not m or "commit" not in m:
            continue
        m = dict(m, sent=sent, got=got)
        rows.append(m)
        kinds = batches[m["bi"]]["kinds"]
        company["alone" if set(kinds) == {"store"} else "with delivery writes"].append(got - sent)
    print(f"{len(rows)} messages of {args.size} bytes, one connection each, "
          f"{'relaying to smtp-sink meanwhile' if args.deliver else 'accept only ([relay] deliver = false)'}; "
          f"{len(rows) / wall:.0f} msg/s; load {load:.1f}")
    print(f"{'step':<62} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'mean ms':>7}")
    for a, b, what in steps:
        v = [1000 * (m[b] - m[a]) for m in rows if m.get(a) is not None and m.get(b) is not None]
        if v:
            print(f"{a + ' -> ' + b + ': ' + what:<62.62} {pct(v, .5):7.3f} {pct(v, .9):7.3f} "
                  f"{pct(v, .99):7.3f} {statistics.fmean(v):7.3f}")
    print("\nthe client's whole cycle per message (one connection each):")
    for i, name in enumerate(STEPS):
        v = [1000 * st[i] for st in csteps]
        print(f"  {name:<16} p50 {pct(v, .5):7.3f} ms  p99 {pct(v, .99):7.3f} ms  mean {statistics.fmean(v):7.3f} ms")
    v = [1000 * sum(st) for st in csteps]
    print(f"  {'all':<16} p50 {pct(v, .5):7.3f} ms  p99 {pct(v, .99):7.3f} ms  mean {statistics.fmean(v):7.3f} ms")
    comp: dict[str, int] = {}
    for m in rows:
        k = ", ".join(f"{n} {k}" for k, n in sorted(batches[m["bi"]]["kinds"].items()))
        comp[k] = comp.get(k, 0) + 1
    print("\ncommits that held a message (what else was in them):")
    for k, n in sorted(comp.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {n:5d}  {k}")
    for k, v in company.items():
        if v:
            print(f"total dot -> 250 when the commit was {k}: n={len(v)} p50 {1000 * pct(v, .5):.3f} ms "
                  f"p99 {1000 * pct(v, .99):.3f} ms")
    dur = [1000 * (b["end"] - b["start"]) for b in batches]
    print(f"\nall commits: {len(batches)}, p50 {pct(dur, .5):.3f} ms, p99 {pct(dur, .99):.3f} ms; "
          f"{len(batches) / max(len(rows) + args.warmup, 1):.2f} per message")
    kinds_total: dict[str, int] = {}
    for b in batches:
        for k, n in b["kinds"].items():
            kinds_total[k] = kinds_total.get(k, 0) + n
    print("writes by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds_total.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
