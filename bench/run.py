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


def loopback_guard(tree: Path | None, dead_port: int) -> str:
    """Config text that keeps an mta able to deliver (one with [relay] and [dns]) on loopback:
    everything goes to a loopback port where nothing listens (so it stays queued), and the
    resolver is a loopback address.  Empty for an mta that cannot deliver yet."""
    relay_dns = ("[relay]\n"
                 f'smarthost = "127.0.0.1:{dead_port}"\n'
                 "[dns]\n"
                 f'nameservers = ["127.0.0.1:{dead_port}"]\n')
    for guard in (relay_dns + '[retry]\nfirst = "1h"\n', relay_dns):
        ok, _ = _config_ok(tree, guard)
        if ok:
            return guard
    ok, err = _config_ok(tree, "[relay]\n")
    if not ok and "unknown section" in err:
        return ""
    raise BenchError("this mta has a [relay] section but bench/run.py cannot pin its delivery to "
                     f"loopback ({err}); refusing to run it")


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


# --------------------------------------------------------------------------- report

def fmt(v: float | None, spec: str) -> str:
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, spec)


def case_name(sessions: int, size: int) -> str:
    unit = f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"
    return f"{sessions}x{unit}"


def report(runs: list[Run], args) -> str:
    lines = []
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
    if use_postfix and os.geteuid() != 0:
        sys.exit("bench: the Postfix reference needs root (or use --only mta)")
    if args.profile or args.py_spy:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    sink: subprocess.Popen | None = None
    postfix_started = False
    runs: list[Run] = []
    failures: list[str] = []
    interrupted = False
    try:
        pf_port = sink_port = 0
        if use_postfix:
            sink_port = free_port()
            pf_port = free_port()
            while pf_port == sink_port:
                pf_port = free_port()
            sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait_for_port(sink_port, 10, sink)
            log(f"smtp-sink on 127.0.0.1:{sink_port}; starting Postfix on 127.0.0.1:{pf_port}")
            postfix_started = True
            subprocess.run([str(POSTFIX_REFERENCE), "start", str(pf_port), str(sink_port)], check=True)
            wait_postfix_drained(args.drain_timeout)

        args.tree_path = None
        args.guard = ""
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
            args.guard = loopback_guard(args.tree_path, args.dead_socket.getsockname()[1])
            if args.guard:
                log("this mta can deliver: its delivery is pinned to a refusing loopback port")

        cases = [(s, l) for l in args.size_list for s in args.session_list]
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
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except (BenchError, RuntimeError, subprocess.CalledProcessError) as e:
        log(f"FAILED: {e}")
        interrupted = True
    finally:
        if postfix_started:
            subprocess.run([str(POSTFIX_REFERENCE), "stop"], check=False)
        stop_process(sink, "smtp-sink")
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
