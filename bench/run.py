#!/usr/bin/env python3
"""Throughput benchmark: mta against Postfix, both driven by Postfix's smtp-source.

    make bench                       # or: .venv/bin/python bench/run.py [options]

What it does, all on loopback:

* starts ``smtp-sink`` (the next hop of the Postfix reference);
* starts Postfix with ``../shared/bench/postfix-reference start PORT SINKPORT``; it
  accepts mail for example.test and relays it to the sink, so its queue drains while
  it accepts (the run waits for the queue to be empty before the next measurement);
* for every case (sessions x message size) and repetition it starts a fresh mta
  daemon (``twistd -n mta``) on a temporary config and an empty SQLite spool, sends a
  small warm-up, then runs ``smtp-source -s SESSIONS -m N -l SIZE`` against Postfix and
  against mta, in alternating order, and measures:

  - wall time -> messages/s (smtp-source exits non-zero on any refused message);
  - mta server CPU per message: utime+stime of the twistd process (all its threads)
    from /proc/PID/stat, after minus before, over the messages of the run;
  - mta peak RSS: VmHWM of the daemon at the end of the run (fresh daemon per run);
  - Postfix CPU per message: utime+stime of master and its live children plus the
    CPU of children master has reaped (cutime+cstime of master), from before the run
    until its queue has drained, so it includes relaying to the sink;
  - that mta's spool holds exactly warm-up + N rows in ``messages`` afterwards.

  In these acceptance cases mta runs with ``[relay] deliver = false`` (accept and queue
  only), so they measure acceptance alone, as in Step 1; its resolver and smarthost are
  still pinned to a refusing loopback port.

* then the end-to-end case (``--e2e`` runs only that, ``--no-e2e`` skips it):
  ``smtp-source -s 20 -m N -l 1024`` against each server, which relays everything to
  the same ``smtp-sink`` (mta: ``[relay] smarthost = "127.0.0.1:SINKPORT"``, ``[dns]
  nameservers`` on a refusing loopback port; Postfix: its relayhost).  The clock runs
  from the start of smtp-source until the sink has counted N more messages *and* the
  server's queue is empty (mta: ``SELECT COUNT(*) FROM messages`` = 0; Postfix:
  ``postfix-reference queued`` = 0); delivered messages/s = N / that time.  mta CPU and
  peak RSS cover the same interval; the sink's session counter gives the connections
  each server opened to it (connection reuse).

It needs root (Postfix) and stops everything it started at the end, even on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = ROOT / ".venv" / "bin" / "twistd"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX_REFERENCE = (ROOT / ".." / "shared" / "bench" / "postfix-reference").resolve()
POSTFIX_MASTER_PID = Path("/var/spool/postfix/pid/master.pid")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# Messages per run for each (sessions, size) case, sized so a run lasts a few seconds.
DEFAULT_COUNTS = {
    (1, 1024): 1000,
    (20, 1024): 5000,
    (1, 102400): 500,
    (20, 102400): 1500,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc helpers

def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat, 1-based like proc(5) (index 0 is a dummy)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    head, _, rest = data.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    return ["", pid_s, comm] + rest.split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    f = proc_stat(pid)
    ticks = int(f[14]) + int(f[15])
    if children:
        ticks += int(f[16]) + int(f[17])
    return ticks / CLK_TCK


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of the main thread alone (the reactor, for twistd): its TID is the PID."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        data = f.read()
    rest = data.rpartition(")")[2].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])
    return total - idle, total


def postfix_cpu_seconds() -> float | None:
    """CPU of the whole Postfix instance: master, its live children, and the children
    it has already reaped (so short-lived smtpd processes are counted)."""
    try:
        master = int(POSTFIX_MASTER_PID.read_text().split()[0])
        total = cpu_seconds(master, children=True)
    except (OSError, ValueError, IndexError):
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            f = proc_stat(int(entry.name))
            if int(f[4]) == master:
                total += (int(f[14]) + int(f[15])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
    return total


def postfix_queued() -> int:
    out = subprocess.run([str(POSTFIX_REFERENCE), "queued"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip() or 0)
    except ValueError:
        return -1


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM; killing it")
        proc.kill()
        proc.wait()


class Sink:
    """``smtp-sink -c`` on loopback: the next hop of both servers.  A thread reads its
    running counters (``sess=N quit=N mesg=N``, one per event, ended by CR) so the
    bench knows how many messages and sessions it has received."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{port}", "1000"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.messages = 0
        self.sessions = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()
        wait_for_port(port, 10, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            buf += chunk
            *done, buf = buf.replace(b"\n", b"\r").split(b"\r")
            for rec in reversed(done):
                fields = dict(kv.split(b"=", 1) for kv in rec.split() if b"=" in kv)
                if b"mesg" in fields:
                    with self._changed:
                        self.messages = int(fields[b"mesg"])
                        self.sessions = int(fields.get(b"sess", b"0"))
                        self._changed.notify_all()
                    break

    def wait_messages(self, target: int, timeout: float) -> bool:
        """Wait until the sink has counted at least *target* messages in all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.messages < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def settle_sessions(self, quiet: float, limit: float = 15.0) -> int:
        """The session count once it has not changed for *quiet* seconds (cached
        connections closing after a run), waiting at most *limit* seconds."""
        deadline = time.monotonic() + limit
        last, since = self.sessions, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.sessions != last:
                last, since = self.sessions, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self) -> None:
        stop_process(self.proc, "smtp-sink")


@dataclass
class SourceResult:
    seconds: float
    client_cpu: float
    machine_busy: float  # fraction of all CPUs busy during the run, 0..1
    load1: float  # 1-minute load average just before the run
    returncode: int
    stderr: str


def run_smtp_source(port: int, sessions: int, count: int, size: int, reuse: bool,
                    timeout: float) -> SourceResult:
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-M", "bench.test", "-f", "a@example.test", "-t", "b@example.test"]
    if reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    errf = tempfile.TemporaryFile()
    load1 = os.getloadavg()[0]
    busy0, tot0 = machine_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    busy1, tot1 = machine_cpu()
    proc.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    stderr = errf.read().decode(errors="replace").strip()
    errf.close()
    return SourceResult(seconds, rusage.ru_utime + rusage.ru_stime,
                        (busy1 - busy0) / max(tot1 - tot0, 1), load1, proc.returncode, stderr)


class Mta:
    """One twistd mta daemon on a fresh spool in its own directory."""

    def __init__(self, workdir: Path, port: int, max_message_size: int, extra_args: list[str],
                 tree: Path | None, guard: str) -> None:
        self.dir = workdir
        self.port = port
        self.spool = workdir / "spool.sqlite"
        self.config = workdir / "mta.toml"
        self.env = dict(os.environ)
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.config.write_text(
            "[server]\n"
            'hostname = "mx.bench.test"\n'
            f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
            f"max_message_size = {max_message_size}\n"
            "max_recipients = 1000\n"
            "max_connections = 1000\n"
            "max_connections_per_client = 1000\n"
            "[policy]\n"
            'relay_networks = ["127.0.0.0/8", "::1/128"]\n'
            'relay_domains = ["example.test"]\n'
            "[spool]\n"
            f'url = "sqlite:///{self.spool}"\n'
            + guard)
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.logfile = workdir / "twistd.log"

    def start(self) -> None:
        argv = [str(TWISTD), "-n", "--pidfile=", "--logfile", str(self.logfile), *self.extra_args,
                "mta", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port, 30, self.proc)
        except RuntimeError:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            raise RuntimeError(f"mta did not start: {err.strip() or self.tail_log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail_log(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def count_messages(self) -> int:
        with contextlib.closing(sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute("SELECT count(*) FROM messages").fetchone()[0]

    def stop(self) -> None:
        stop_process(self.proc, "mta")


# --------------------------------------------------------------------------- the tree under test

def snapshot(rev: str, dest: Path) -> Path:
    """Extract ``git archive REV`` of this repository into dest (a stable copy of mta to
    benchmark while the work tree changes)."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _config_ok(tree: Path | None, toml: str) -> tuple[bool, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    code = ("import sys, tomllib\n"
            "from mta.config import config_from_dict\n"
            "config_from_dict(tomllib.loads(sys.stdin.read()), 'bench')\n")
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], input=toml, text=True,
                       capture_output=True, env=env, cwd=tree or ROOT)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def _relay_dns(smarthost_port: int, dns_port: int, relay_extra: str = "") -> str:
    return ("[relay]\n"
            f'smarthost = "127.0.0.1:{smarthost_port}"\n'
            + relay_extra
            + "[dns]\n"
            f'nameservers = ["127.0.0.1:{dns_port}"]\n')


def loopback_guard(tree: Path | None, dead_port: int) -> tuple[str, str]:
    """Config text for the acceptance cases, and what it does.  For an mta that knows
    ``[relay] deliver``: no delivery at all (acceptance is measured alone).  For an older
    one that can deliver: everything goes to a loopback port where nothing listens (so it
    stays queued).  Either way the resolver is a loopback address.  ("", ...) for an mta
    that cannot deliver yet."""
    relay_dns = _relay_dns(dead_port, dead_port)
    candidates = [
        (_relay_dns(dead_port, dead_port, "deliver = false\n"), "[relay] deliver = false (accept and queue only)"),
        (relay_dns + '[retry]\nfirst = "1h"\n', "delivering to a refusing loopback port (retry after 1h)"),
        (relay_dns, "delivering to a refusing loopback port"),
    ]
    for guard, what in candidates:
        ok, _ = _config_ok(tree, guard)
        if ok:
            return guard, what
    ok, err = _config_ok(tree, "[relay]\n")
    if not ok and "unknown section" in err:
        return "", "no delivery (this mta has no [relay] section)"
    raise BenchError("this mta has a [relay] section but bench/run.py cannot pin its delivery to "
                     f"loopback ({err}); refusing to run it")


def e2e_relay_config(tree: Path | None, sink_port: int, dead_port: int, relay_extra: str) -> str:
    """Config text for the end-to-end case: everything to the sink, the resolver on a
    refusing loopback port (nothing may leave loopback)."""
    guard = _relay_dns(sink_port, dead_port, relay_extra)
    ok, err = _config_ok(tree, guard)
    if not ok:
        raise BenchError(f"this mta cannot relay to the sink ({err})")
    return guard


# --------------------------------------------------------------------------- measurements

@dataclass
class Run:
    server: str
    sessions: int
    size: int
    messages: int
    rep: int
    order: int  # 0 = ran first in its pair, 1 = second
    seconds: float
    rate: float
    cpu_ms_per_msg: float | None
    client_cpu_ms_per_msg: float
    machine_busy_pct: float
    load1: float
    peak_rss_mb: float | None = None
    stored: int | None = None
    drain_seconds: float | None = None
    main_thread_cpu_ms_per_msg: float | None = None  # mta: the reactor thread alone
    reactor_busy_pct: float | None = None  # mta: reactor thread CPU / wall time
    notes: list[str] = field(default_factory=list)
    kind: str = "accept"  # "accept": acceptance only; "e2e": smtp-source -> server -> sink, until drained
    source_seconds: float | None = None  # e2e: when smtp-source was done (all accepted)
    sink_sessions: int | None = None  # e2e: SMTP sessions the server opened to the sink


class BenchError(Exception):
    pass


def run_mta(args, sessions: int, size: int, count: int, rep: int, order: int, tmp: Path) -> Run:
    workdir = tmp / f"mta-s{sessions}-l{size}-r{rep}"
    workdir.mkdir()
    extra = []
    if args.profile:
        extra = ["--profiler=cprofile", "--savestats",
                 "--profile", str(Path(args.profile_dir) / f"mta-s{sessions}-l{size}-r{rep}.pstats")]
    mta = Mta(workdir, free_port(), max(args.max_message_size, 2 * size), extra, args.tree_path,
              args.guard)
    try:
        mta.start()
        warm = min(args.warmup, count)
        if warm:
            w = run_smtp_source(mta.port, min(sessions, warm), warm, size, args.reuse, args.timeout)
            if w.returncode != 0:
                raise BenchError(f"mta warm-up failed: {w.stderr}\n{mta.tail_log()}")
        time.sleep(0.2)
        with open(f"/proc/{mta.pid}/clear_refs", "w") as f:  # reset VmHWM (Linux >= 4.0)
            f.write("5")
        spy = None
        if args.py_spy:
            out = Path(args.profile_dir) / f"mta-s{sessions}-l{size}-r{rep}.pyspy.txt"
            extra_spy = args.py_spy_args.split()
            if "--native" not in extra_spy and "-n" not in extra_spy:
                extra_spy.append("--nonblocking")  # py-spy cannot do both
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(mta.pid), "--threads",
                                    "--rate", "250", "--format", "raw", "--output", str(out),
                                    *extra_spy],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu0 = cpu_seconds(mta.pid)
        main0 = main_thread_cpu_seconds(mta.pid)
        r = run_smtp_source(mta.port, sessions, count, size, args.reuse, args.timeout)
        time.sleep(0.2)  # let the daemon finish closing connections
        cpu1 = cpu_seconds(mta.pid)
        main1 = main_thread_cpu_seconds(mta.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        hwm = vm_hwm_kb(mta.pid)
        if r.returncode != 0:
            raise BenchError(f"smtp-source against mta failed ({r.returncode}): {r.stderr}\n{mta.tail_log()}")
        stored = mta.count_messages()
        expected = warm + count
        if stored != expected:
            raise BenchError(f"mta spool holds {stored} messages, expected {expected}")
    finally:
        mta.stop()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return Run("mta", sessions, size, count, rep, order, r.seconds, count / r.seconds,
               (cpu1 - cpu0) * 1000 / count, r.client_cpu * 1000 / count, 100 * r.machine_busy,
               r.load1, peak_rss_mb=hwm / 1024, stored=stored - warm,
               main_thread_cpu_ms_per_msg=(main1 - main0) * 1000 / count,
               reactor_busy_pct=100 * (main1 - main0) / r.seconds)


def wait_postfix_drained(timeout: float) -> float:
    t0 = time.perf_counter()
    while True:
        q = postfix_queued()
        if q == 0:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"Postfix still holds {q} messages after {timeout}s (is the sink up?)")
        time.sleep(0.1)


def run_postfix(args, port: int, sessions: int, size: int, count: int, rep: int, order: int) -> Run:
    warm = min(args.warmup, count)
    if warm:
        w = run_smtp_source(port, min(sessions, warm), warm, size, args.reuse, args.timeout)
        if w.returncode != 0:
            raise BenchError(f"Postfix warm-up failed: {w.stderr}")
    wait_postfix_drained(args.drain_timeout)
    cpu0 = postfix_cpu_seconds()
    r = run_smtp_source(port, sessions, count, size, args.reuse, args.timeout)
    if r.returncode != 0:
        raise BenchError(f"smtp-source against Postfix failed ({r.returncode}): {r.stderr}")
    left = postfix_queued()
    drain = wait_postfix_drained(args.drain_timeout)
    cpu1 = postfix_cpu_seconds()
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1000 / count
    notes = [f"{left} still queued at the end of the run, drained in {drain:.1f}s"]
    return Run("postfix", sessions, size, count, rep, order, r.seconds, count / r.seconds, cpu,
               r.client_cpu * 1000 / count, 100 * r.machine_busy, r.load1, drain_seconds=drain, notes=notes)


# --------------------------------------------------------------------------- end to end

def _spy_start(args, pid: int, name: str) -> subprocess.Popen | None:
    if not args.py_spy:
        return None
    out = Path(args.profile_dir) / f"{name}.pyspy.txt"
    extra_spy = args.py_spy_args.split()
    if "--native" not in extra_spy and "-n" not in extra_spy:
        extra_spy.append("--nonblocking")  # py-spy cannot do both
    spy = subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--threads",
                            "--rate", "250", "--format", "raw", "--output", str(out), *extra_spy],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return spy


def _spy_stop(spy: subprocess.Popen | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def _start_source(port: int, sessions: int, count: int, size: int, reuse: bool, timeout: float):
    """smtp-source in a thread (the e2e clock keeps running after it exits)."""
    box: dict[str, SourceResult] = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "r", run_smtp_source(port, sessions, count, size, reuse, timeout)), daemon=True)
    t.start()
    return t, box


def _drain(sink: Sink, target: int, queue_empty, t0: float, timeout: float, what: str,
           src: tuple[threading.Thread, dict]) -> float:
    """Wait until the sink has *target* messages in all and queue_empty() is true; returns
    the seconds since t0 at that moment.  Fails early if smtp-source failed."""
    thread, box = src
    deadline = time.monotonic() + timeout
    while not sink.wait_messages(target, 0.25):
        if not thread.is_alive() and box.get("r") is not None and box["r"].returncode != 0:
            raise BenchError(f"smtp-source against {what} failed ({box['r'].returncode}): {box['r'].stderr}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the sink has {sink.messages} of {target} messages after {timeout}s")
    while not queue_empty():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: queue not empty after {timeout}s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def run_mta_e2e(args, sink: Sink, sessions: int, size: int, count: int, rep: int, order: int,
                tmp: Path) -> Run:
    name = f"mta-e2e-s{sessions}-l{size}-r{rep}"
    workdir = tmp / name
    workdir.mkdir()
    extra = []
    if args.profile:
        extra = ["--profiler=cprofile", "--savestats",
                 "--profile", str(Path(args.profile_dir) / f"{name}.pstats")]
    mta = Mta(workdir, free_port(), max(args.max_message_size, 2 * size), extra, args.tree_path,
              args.e2e_guard)
    try:
        mta.start()
        db = sqlite3.connect(f"file:{mta.spool}?mode=ro", uri=True, timeout=30)
        with contextlib.closing(db):
            def spool_empty() -> bool:
                return db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
            warm = min(args.warmup, count)
            if warm:
                base = sink.messages
                src = _start_source(mta.port, min(sessions, warm), warm, size, args.reuse, args.timeout)
                _drain(sink, base + warm, spool_empty, time.perf_counter(), args.drain_timeout,
                       "mta warm-up", src)
                src[0].join()
            time.sleep(0.2)
            with open(f"/proc/{mta.pid}/clear_refs", "w") as f:  # reset VmHWM
                f.write("5")
            spy = _spy_start(args, mta.pid, name)
            base, sess0 = sink.messages, sink.sessions
            cpu0 = cpu_seconds(mta.pid)
            main0 = main_thread_cpu_seconds(mta.pid)
            busy0, tot0 = machine_cpu()
            t0 = time.perf_counter()
            src = _start_source(mta.port, sessions, count, size, args.reuse, args.timeout)
            try:
                seconds = _drain(sink, base + count, spool_empty, t0, args.drain_timeout, "mta", src)
            except BenchError as e:
                raise BenchError(f"{e}\n{mta.tail_log()}") from None
            cpu1 = cpu_seconds(mta.pid)
            main1 = main_thread_cpu_seconds(mta.pid)
            busy1, tot1 = machine_cpu()
            src[0].join()
            _spy_stop(spy)
            hwm = vm_hwm_kb(mta.pid)
            r = src[1]["r"]
            if r.returncode != 0:
                raise BenchError(f"smtp-source against mta failed ({r.returncode}): {r.stderr}\n{mta.tail_log()}")
            time.sleep(0.2)
            got = sink.messages - base
            if got != count:
                raise BenchError(f"the sink received {got} messages from mta, expected {count}")
    finally:
        mta.stop()  # QUITs its cached connections, so the sink counts them as sessions
    conns = sink.settle_sessions(0.5) - sess0
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return Run("mta", sessions, size, count, rep, order, seconds, count / seconds,
               (cpu1 - cpu0) * 1000 / count, r.client_cpu * 1000 / count,
               100 * (busy1 - busy0) / max(tot1 - tot0, 1), r.load1, peak_rss_mb=hwm / 1024,
               stored=got, main_thread_cpu_ms_per_msg=(main1 - main0) * 1000 / count,
               reactor_busy_pct=100 * (main1 - main0) / seconds, kind="e2e",
               source_seconds=r.seconds, sink_sessions=conns)


def run_postfix_e2e(args, sink: Sink, port: int, sessions: int, size: int, count: int, rep: int,
                    order: int) -> Run:
    warm = min(args.warmup, count)
    if warm:
        w = run_smtp_source(port, min(sessions, warm), warm, size, args.reuse, args.timeout)
        if w.returncode != 0:
            raise BenchError(f"Postfix warm-up failed: {w.stderr}")
    wait_postfix_drained(args.drain_timeout)
    time.sleep(0.2)
    base, sess0 = sink.messages, sink.sessions
    cpu0 = postfix_cpu_seconds()
    busy0, tot0 = machine_cpu()
    t0 = time.perf_counter()
    src = _start_source(port, sessions, count, size, args.reuse, args.timeout)
    seconds = _drain(sink, base + count, lambda: postfix_queued() == 0, t0, args.drain_timeout,
                     "Postfix", src)
    cpu1 = postfix_cpu_seconds()
    busy1, tot1 = machine_cpu()
    src[0].join()
    r = src[1]["r"]
    if r.returncode != 0:
        raise BenchError(f"smtp-source against Postfix failed ({r.returncode}): {r.stderr}")
    time.sleep(0.2)
    got = sink.messages - base
    if got != count:
        raise BenchError(f"the sink received {got} messages from Postfix, expected {count}")
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1000 / count
    conns = sink.settle_sessions(3.0) - sess0  # Postfix's connection cache lets go after 2s
    return Run("postfix", sessions, size, count, rep, order, seconds, count / seconds, cpu,
               r.client_cpu * 1000 / count, 100 * (busy1 - busy0) / max(tot1 - tot0, 1), r.load1,
               stored=got, kind="e2e", source_seconds=r.seconds, sink_sessions=conns)


# --------------------------------------------------------------------------- report

def fmt(v: float | None, spec: str) -> str:
    if v is None:
        width = spec.split(".")[0].rstrip("dfs")
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, spec)


def case_name(sessions: int, size: int) -> str:
    unit = f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"
    return f"{sessions}x{unit}"


def report(runs: list[Run], args) -> str:
    accept = [r for r in runs if r.kind == "accept"]
    e2e = [r for r in runs if r.kind == "e2e"]
    parts = []
    if accept:
        parts.append(report_accept(accept, args))
    if e2e:
        parts.append(report_e2e(e2e, args))
    return "\n\n".join(parts)


def report_e2e(runs: list[Run], args) -> str:
    lines = ["End to end: smtp-source -> server -> smtp-sink, until the sink has every message "
             "and the server's queue is empty"]
    hdr = (f"{'case':<9} {'rep':>3} {'msgs':>5} | {'mta msg/s':>9} {'CPU ms/msg':>10} {'RSS MB':>7} "
           f"{'src s':>6} {'conns':>5} {'busy%':>5} | {'Postfix msg/s':>13} {'CPU ms/msg':>10} "
           f"{'src s':>6} {'conns':>5} {'busy%':>5} | {'mta/Postfix':>11}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    keys = sorted({(r.sessions, r.size, r.rep) for r in runs}, key=lambda k: (k[1], k[0], k[2]))
    ratios: dict[tuple[int, int], list[float]] = {}
    for s, l, rep in keys:
        m = next((r for r in runs if (r.server, r.sessions, r.size, r.rep) == ("mta", s, l, rep)), None)
        p = next((r for r in runs if (r.server, r.sessions, r.size, r.rep) == ("postfix", s, l, rep)), None)
        ratio = m.rate / p.rate if m and p else None
        if ratio is not None:
            ratios.setdefault((s, l), []).append(ratio)
        first = ""
        if m and p:
            first = " (mta first)" if m.order == 0 else " (Postfix first)"
        lines.append(
            f"{case_name(s, l):<9} {rep + 1:>3} {(m or p).messages:>5} | "
            f"{fmt(m and m.rate, '9.0f')} {fmt(m and m.cpu_ms_per_msg, '10.3f')} "
            f"{fmt(m and m.peak_rss_mb, '7.1f')} {fmt(m and m.source_seconds, '6.2f')} "
            f"{fmt(m and m.sink_sessions, '5d')} {fmt(m and m.machine_busy_pct, '5.0f')} | "
            f"{fmt(p and p.rate, '13.0f')} {fmt(p and p.cpu_ms_per_msg, '10.3f')} "
            f"{fmt(p and p.source_seconds, '6.2f')} {fmt(p and p.sink_sessions, '5d')} "
            f"{fmt(p and p.machine_busy_pct, '5.0f')} | "
            + (f"{ratio:10.2f}x" if ratio is not None else f"{'-':>11}") + first)
    if any(len(v) > 1 for v in ratios.values()):
        lines.append("")
        lines.append("median mta/Postfix ratio: " + ", ".join(
            f"{case_name(s, l)} {statistics.median(v):.2f}x" for (s, l), v in ratios.items()))
    lines.append("")
    lines.append(
        "msg/s = messages delivered to the sink / seconds from the start of smtp-source until the "
        "sink had them all and the queue was empty (mta: no rows in messages; Postfix: "
        "postfix-reference queued = 0); src s = when smtp-source was done; conns = SMTP sessions "
        "the server opened to the sink; CPU = all of the server's processes/threads over the run; "
        f"busy% = whole machine; 1-min load average before the runs "
        f"{min(r.load1 for r in runs):.1f}-{max(r.load1 for r in runs):.1f}.")
    lines.append(
        f"mta: [relay] smarthost = the sink, [dns] nameservers on a refusing loopback port"
        + (f", [relay] {args.e2e_relay.strip()}" if args.e2e_relay.strip() else
           ", other [relay] keys at their defaults")
        + "; fresh daemon and empty spool per run; RSS = VmHWM reset before the run.")
    return "\n".join(lines)


def report_accept(runs: list[Run], args) -> str:
    lines = ["Acceptance: smtp-source -> server (mta: " + args.guard_what + ")"]
    hdr = (f"{'case':<9} {'rep':>3} {'msgs':>5} | {'mta msg/s':>9} {'CPU ms/msg':>10} {'RSS MB':>7} "
           f"{'busy%':>5} | {'Postfix msg/s':>13} {'CPU ms/msg':>10} {'busy%':>5} {'drain s':>7} | "
           f"{'mta/Postfix':>11}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    keys = sorted({(r.sessions, r.size, r.rep) for r in runs}, key=lambda k: (k[1], k[0], k[2]))
    ratios: dict[tuple[int, int], list[float]] = {}
    for s, l, rep in keys:
        m = next((r for r in runs if (r.server, r.sessions, r.size, r.rep) == ("mta", s, l, rep)), None)
        p = next((r for r in runs if (r.server, r.sessions, r.size, r.rep) == ("postfix", s, l, rep)), None)
        ratio = m.rate / p.rate if m and p else None
        if ratio is not None:
            ratios.setdefault((s, l), []).append(ratio)
        first = ""
        if m and p:
            first = " (mta first)" if m.order == 0 else " (Postfix first)"
        lines.append(
            f"{case_name(s, l):<9} {rep + 1:>3} {(m or p).messages:>5} | "
            f"{fmt(m and m.rate, '9.0f')} {fmt(m and m.cpu_ms_per_msg, '10.3f')} "
            f"{fmt(m and m.peak_rss_mb, '7.1f')} {fmt(m and m.machine_busy_pct, '5.0f')} | "
            f"{fmt(p and p.rate, '13.0f')} {fmt(p and p.cpu_ms_per_msg, '10.3f')} "
            f"{fmt(p and p.machine_busy_pct, '5.0f')} {fmt(p and p.drain_seconds, '7.1f')} | "
            + (f"{ratio:10.2f}x" if ratio is not None else f"{'-':>11}") + first)
    if any(len(v) > 1 for v in ratios.values()):
        lines.append("")
        lines.append("median mta/Postfix ratio per case: " + ", ".join(
            f"{case_name(s, l)} {statistics.median(v):.2f}x" for (s, l), v in ratios.items()))
    lines.append("")
    lines.append(
        f"smtp-source {'reuses connections (-d)' if args.reuse else 'opens one connection per message'}; "
        f"{NCPU} CPUs; busy% = whole-machine CPU busy during the run (load tool, server, and anything else); "
        f"1-min load average before the runs {min(r.load1 for r in runs):.1f}-{max(r.load1 for r in runs):.1f}.")
    cl = {srv: [r.client_cpu_ms_per_msg for r in runs if r.server == srv] for srv in ("mta", "postfix")}
    lines.append("smtp-source's own CPU per message: " + ", ".join(
        f"against {srv} {min(v):.2f}-{max(v):.2f} ms" for srv, v in cl.items() if v) + ".")
    lines.append(
        "mta: fresh daemon and empty SQLite spool per run; every 250 checked against the spool's "
        "messages table; CPU = twistd process (all threads); RSS = VmHWM reset before the run.")
    lines.append(
        "Postfix relays what it accepts to smtp-sink while it accepts (its queue drains concurrently); "
        "its CPU covers all its processes from the start of the run until the queue is empty, relay included.")
    lines.append(f"mta in these cases: {args.guard_what}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,20", help="comma-separated session counts (default 1,20)")
    p.add_argument("--sizes", default="1024,102400", help="comma-separated message sizes in bytes (default 1024,102400)")
    p.add_argument("-m", "--messages", type=int, default=None,
                   help="messages per run for every case (default: per case, "
                   + ", ".join(f"{case_name(s, l)}={n}" for (s, l), n in DEFAULT_COUNTS.items()) + ")")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default message counts")
    p.add_argument("-r", "--repeat", type=int, default=1, help="repetitions of every case (default 1)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up messages before each measured run")
    p.add_argument("--reuse", action="store_true", help="smtp-source -d: several messages per connection")
    p.add_argument("--only", choices=["mta", "postfix", "both"], default="both")
    p.add_argument("--max-message-size", type=int, default=10 * 1024 * 1024)
    p.add_argument("--timeout", type=float, default=600, help="seconds before a smtp-source run is killed")
    p.add_argument("--drain-timeout", type=float, default=300)
    p.add_argument("--rev", help="benchmark this git revision of mta (extracted to a temporary "
                   "directory) instead of the work tree, e.g. HEAD")
    p.add_argument("--tree", help="benchmark the mta package in this directory (a copy of the "
                   "repository) instead of the work tree")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (spools, logs)")
    p.add_argument("--json", help="also write every run as JSON to this file")
    p.add_argument("--profile", action="store_true",
                   help="run mta under twistd's cProfile (slower) and save stats in --profile-dir")
    p.add_argument("--py-spy", metavar="PATH",
                   help="sample mta during each measured run with this py-spy binary "
                   "(all threads, raw collapsed stacks in --profile-dir)")
    p.add_argument("--py-spy-args", default="", help="extra py-spy record arguments, e.g. --native")
    p.add_argument("--profile-dir", default="bench/profiles")
    e = p.add_mutually_exclusive_group()
    e.add_argument("--e2e", action="store_true",
                   help="run only the end-to-end case (smtp-source -> server -> smtp-sink)")
    e.add_argument("--no-e2e", action="store_true", help="run only the acceptance cases")
    p.add_argument("--e2e-sessions", type=int, default=20, help="end-to-end: smtp-source sessions (20)")
    p.add_argument("--e2e-size", type=int, default=1024, help="end-to-end: message size (1024)")
    p.add_argument("--e2e-messages", type=int, default=None,
                   help="end-to-end: messages per run (default 3000, times --scale)")
    p.add_argument("--e2e-relay", default="",
                   help="end-to-end: extra [relay] keys for mta, separated by ';', e.g. "
                   "'per_destination = 20; concurrency = 40' (default: none, the defaults)")
    args = p.parse_args(argv)
    args.session_list = [int(x) for x in args.sessions.split(",") if x]
    args.size_list = [int(x) for x in args.sizes.split(",") if x]
    return args


def count_for(args, sessions: int, size: int) -> int:
    if args.messages:
        return args.messages
    n = DEFAULT_COUNTS.get((sessions, size))
    if n is None:  # interpolate: roughly constant bytes for large sizes, more for many sessions
        n = 1000 if size <= 16384 else 500
        if sessions > 1:
            n *= 3
    return max(1, int(n * args.scale))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit(f"bench: {tool} not found: run {POSTFIX_REFERENCE} install")
    if not TWISTD.exists():
        sys.exit(f"bench: {TWISTD} not found: run make venv")
    use_postfix = args.only in ("postfix", "both")
    use_mta = args.only in ("mta", "both")
    do_accept = not args.e2e
    do_e2e = not args.no_e2e
    if use_postfix and os.geteuid() != 0:
        sys.exit("bench: the Postfix reference needs root (or use --only mta)")
    if args.profile or args.py_spy:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    sink: Sink | None = None
    postfix_started = False
    runs: list[Run] = []
    failures: list[str] = []
    interrupted = False
    try:
        pf_port = sink_port = 0
        if use_postfix or do_e2e:
            sink_port = free_port()
            sink = Sink(sink_port)
            log(f"smtp-sink on 127.0.0.1:{sink_port}")
        if use_postfix:
            pf_port = free_port()
            while pf_port == sink_port:
                pf_port = free_port()
            log(f"starting Postfix on 127.0.0.1:{pf_port}")
            postfix_started = True
            subprocess.run([str(POSTFIX_REFERENCE), "start", str(pf_port), str(sink_port)], check=True)
            wait_postfix_drained(args.drain_timeout)

        args.tree_path = None
        args.guard = ""
        args.guard_what = "-"
        args.e2e_guard = ""
        if use_mta:
            if args.tree:
                args.tree_path = Path(args.tree).resolve()
                log(f"benchmarking mta from {args.tree_path}")
            elif args.rev:
                args.tree_path = snapshot(args.rev, tmp / "tree")
                log(f"benchmarking mta at {args.rev} "
                    f"({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', args.rev], capture_output=True, text=True).stdout.strip()})")
            else:
                dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "mta", "twisted"],
                                       capture_output=True, text=True).stdout.strip()
                log("benchmarking mta from the work tree" + (" (with uncommitted changes)" if dirty else ""))
            # A socket bound but not listening: connections to it are refused.
            args.dead_socket = socket.socket()
            args.dead_socket.bind(("127.0.0.1", 0))
            dead_port = args.dead_socket.getsockname()[1]
            args.guard, args.guard_what = loopback_guard(args.tree_path, dead_port)
            if do_accept:
                log(f"acceptance cases: mta runs with {args.guard_what}")
            if do_e2e:
                args.e2e_guard = e2e_relay_config(args.tree_path, sink_port, dead_port,
                                                  "\n".join(x.strip() for x in args.e2e_relay.split(";")
                                                            if x.strip()) + ("\n" if args.e2e_relay.strip() else ""))

        cases = [(s, l) for l in args.size_list for s in args.session_list] if do_accept else []
        for rep in range(args.repeat):
            for i, (s, l) in enumerate(cases):
                n = count_for(args, s, l)
                servers = []
                if use_postfix:
                    servers.append("postfix")
                if use_mta:
                    servers.append("mta")
                if (rep + i) % 2:
                    servers.reverse()
                for order, server in enumerate(servers):
                    log(f"rep {rep + 1}/{args.repeat} {case_name(s, l)} x {n} -> {server}")
                    try:
                        if server == "mta":
                            run = run_mta(args, s, l, n, rep, order, tmp)
                        else:
                            run = run_postfix(args, pf_port, s, l, n, rep, order)
                    except (BenchError, RuntimeError) as e:
                        log(f"FAILED: {e}")
                        failures.append(f"rep {rep + 1} {case_name(s, l)} {server}: {str(e).splitlines()[0]}")
                        continue
                    log(f"   {run.rate:.0f} msg/s in {run.seconds:.2f}s, server CPU "
                        f"{fmt(run.cpu_ms_per_msg, '.3f')} ms/msg, machine busy {run.machine_busy_pct:.0f}%"
                        + (f", peak RSS {run.peak_rss_mb:.1f} MB" if run.peak_rss_mb else "")
                        + (f"; reactor thread {run.main_thread_cpu_ms_per_msg:.3f} ms/msg, "
                           f"{run.reactor_busy_pct:.0f}% busy" if run.reactor_busy_pct is not None else "")
                        + (f"; {'; '.join(run.notes)}" if run.notes else ""))
                    runs.append(run)
        if do_e2e:
            s, l = args.e2e_sessions, args.e2e_size
            n = args.e2e_messages or max(1, int(3000 * args.scale))
            for rep in range(args.repeat):
                servers = []
                if use_postfix:
                    servers.append("postfix")
                if use_mta:
                    servers.append("mta")
                if rep % 2:
                    servers.reverse()
                for order, server in enumerate(servers):
                    log(f"rep {rep + 1}/{args.repeat} end to end {case_name(s, l)} x {n} -> {server} -> sink")
                    try:
                        if server == "mta":
                            run = run_mta_e2e(args, sink, s, l, n, rep, order, tmp)
                        else:
                            run = run_postfix_e2e(args, sink, pf_port, s, l, n, rep, order)
                    except (BenchError, RuntimeError) as e:
                        log(f"FAILED: {e}")
                        failures.append(f"rep {rep + 1} e2e {case_name(s, l)} {server}: {str(e).splitlines()[0]}")
                        continue
                    log(f"   {run.rate:.0f} msg/s delivered in {run.seconds:.2f}s (smtp-source done after "
                        f"{run.source_seconds:.2f}s), server CPU {fmt(run.cpu_ms_per_msg, '.3f')} ms/msg, "
                        f"{run.sink_sessions} sessions to the sink, machine busy {run.machine_busy_pct:.0f}%"
                        + (f", peak RSS {run.peak_rss_mb:.1f} MB" if run.peak_rss_mb else "")
                        + (f"; reactor thread {run.main_thread_cpu_ms_per_msg:.3f} ms/msg, "
                           f"{run.reactor_busy_pct:.0f}% busy" if run.reactor_busy_pct is not None else ""))
                    runs.append(run)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except (BenchError, RuntimeError, subprocess.CalledProcessError) as e:
        log(f"FAILED: {e}")
        interrupted = True
    finally:
        if postfix_started:
            subprocess.run([str(POSTFIX_REFERENCE), "stop"], check=False)
        if sink is not None:
            sink.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if runs:
        print()
        print(report(runs, args))
    for f in failures:
        print(f"FAILED: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 1 if interrupted or failures else 0


if __name__ == "__main__":
    sys.exit(main())
