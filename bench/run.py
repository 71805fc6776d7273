#!/usr/bin/env python3
"""Throughput and latency benchmark: mta against Postfix, in the same run, on loopback.

    make bench                                   # every case, one pair each
    .venv/bin/python bench/run.py --cases inbound,e2e -r 3
    .venv/bin/python bench/run.py --cases inbound:1x1KB -r 5 --py-spy

What it does, all on loopback:

* starts ``smtp-sink`` (the next hop of both servers) and Postfix with
  ``../shared/bench/postfix-reference start PORT SINKPORT``, which accepts mail for
  example.test and relays all of it to the sink;
* for every case and repetition it measures both servers, in alternating order (a
  *pair*), each time after a small warm-up: mta is a fresh daemon (``twistd -n mta``)
  on a temporary config and an empty SQLite spool per run; its ``[dns] nameservers``
  (and, when it must not deliver, its smarthost) point at a loopback port where
  nothing listens.

Cases (``--cases``, comma-separated; a kind alone stands for its usual set):

``accept[:SxSIZE]``  acceptance only: ``smtp-source -s S -l SIZE`` -> server.  mta runs
    with ``[relay] deliver = false``; Postfix relays to the sink meanwhile (as it
    always does).  The grid of ``--sessions`` x ``--sizes`` by default.
``inbound[:SxSIZE]``  inbound while delivering: both servers relay everything to the
    sink during the run (mta: ``[relay] smarthost`` = the sink).  msg/s = messages
    accepted / the client's wall time.  By default 20x1KB, 1x1KB and 20x100KB.
``e2e[:SxSIZE]``  end to end: the same runs as inbound, timed until the sink has every
    message and the server's queue is empty.  An ``inbound`` and an ``e2e`` case of the
    same shape share their runs.  By default ``--e2e-sessions`` x ``--e2e-size``.

Every run records:

- msg/s (the load tool exits non-zero, or the Python client stops, on any refused
  message; mta's spool or the sink is checked for exactly N messages afterwards);
- the server's CPU per message: utime+stime of every process of the server (mta: the
  twistd process and any descendants, all threads; Postfix: master and its
  descendants), plus what they have reaped (cutime+cstime), from the start of the run
  until the end of the work it caused (a server that delivers: until its queue is
  empty; mta accepting only: until the client is done), over the N messages; for mta
  also the main (reactor) threads alone;
- peak RSS: the largest VmHWM/VmRSS of any one process of the server (per worker),
  and the peak of the sum of their PSS, sampled;
- the 1-minute load average just before the run, and how busy the whole machine was;
- for 1-session cases (driven by a Python client, ``--single-client``): p50/p99 of the
  time between sending the final ``.`` and receiving the whole ``250`` reply
  (time.perf_counter, TCP_NODELAY).

The report gives every pair, then per case the medians over the pairs and the median
of the pairs' mta/Postfix ratios.  ``--json`` also keeps the kernel share of the CPU
and mta's CPU per thread (by thread id, as py-spy names them).

Profiling: ``--py-spy`` (``.venv/bin/pip install py-spy``) samples mta during each
measured run; ``--py-spy-args=--gil`` keeps only the thread holding the GIL (where the
Python CPU goes); summarise with ``bench/pyspy_top.py FILE [N [THREAD]]``.
``bench/latency_probe.py`` breaks the 1-session dot -> 250 time into its steps.  It needs root (Postfix) and stops everything it
started at the end, even on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
TWISTD = ROOT / ".venv" / "bin" / "twistd"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"


def _postfix_reference() -> Path:
    """../shared/bench/postfix-reference beside this checkout or, from a git worktree,
    beside the main checkout ($MTA_POSTFIX_REFERENCE overrides)."""
    if os.environ.get("MTA_POSTFIX_REFERENCE"):
        return Path(os.environ["MTA_POSTFIX_REFERENCE"])
    candidates = [ROOT / ".." / "shared" / "bench" / "postfix-reference"]
    common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute",
                             "--git-common-dir"], capture_output=True, text=True).stdout.strip()
    if common:
        candidates.append(Path(common).parent / ".." / "shared" / "bench" / "postfix-reference")
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0].resolve()


POSTFIX_REFERENCE = _postfix_reference()
POSTFIX_MASTER_PID = Path("/var/spool/postfix/pid/master.pid")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# Messages per run for each (mode, sessions, size), sized so a run lasts a few seconds.
DEFAULT_COUNTS = {
    ("accept", 1, 1024): 1000,
    ("accept", 20, 1024): 5000,
    ("accept", 1, 102400): 500,
    ("accept", 20, 102400): 1500,
    ("relay", 1, 1024): 1000,
    ("relay", 20, 1024): 3000,
    ("relay", 1, 102400): 500,
    ("relay", 20, 102400): 1000,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc helpers

def proc_stat(pid: int, tid: int | None = None) -> list[str]:
    """Fields of /proc/PID/stat (or of one thread), 1-based like proc(5) (index 0 is a dummy)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        data = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    head, _, rest = data.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    return ["", pid_s, comm] + rest.split()


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class ProcTree:
    """A server's processes: *root* and its live descendants, found in /proc."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                children.setdefault(int(proc_stat(int(entry.name))[4]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds of the whole tree incl. reaped children, of the main threads alone,
        and the system (kernel) part of the first."""
        total = main = system = 0
        for pid in self.pids():
            try:
                f = proc_stat(pid)
                t = proc_stat(pid, pid)
            except (OSError, ValueError, IndexError):
                continue
            total += int(f[14]) + int(f[15]) + int(f[16]) + int(f[17])
            system += int(f[15]) + int(f[17])
            main += int(t[14]) + int(t[15])
        return total / CLK_TCK, main / CLK_TCK, system / CLK_TCK

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds of every live thread of the tree, by thread id (py-spy names them)."""
        out: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        f = proc_stat(pid, int(tid))
                        out[int(tid)] = (int(f[14]) + int(f[15])) / CLK_TCK
        return out

    def reset_peaks(self) -> None:
        """Reset VmHWM of every process (Linux >= 4.0)."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")


class MemorySampler:
    """Samples a ProcTree's memory in a thread: the peak RSS of any one process (also
    VmHWM at the end) and the peak of the sum of PSS over its processes."""

    def __init__(self, tree: ProcTree, interval: float = 0.25) -> None:
        self.tree = tree
        self.interval = interval
        self.proc_peak_kb = 0
        self.pss_peak_kb = 0
        self.nprocs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()

    def _sample(self, final: bool = False) -> None:
        pss = 0
        pids = self.tree.pids()
        self.nprocs = max(self.nprocs, len(pids))
        for pid in pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                st = _status_kb(pid, ("VmRSS", "VmHWM"))
                self.proc_peak_kb = max(self.proc_peak_kb, st.get("VmRSS", 0),
                                        st.get("VmHWM", 0) if final else 0)
                pss += _pss_kb(pid)
        self.pss_peak_kb = max(self.pss_peak_kb, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(final=True)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])
    return total - idle, total


def postfix_master() -> int:
    try:
        return int(POSTFIX_MASTER_PID.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise BenchError(f"no Postfix master ({POSTFIX_MASTER_PID})") from None


def postfix_queued() -> int:
    out = subprocess.run([str(POSTFIX_REFERENCE), "queued"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip() or 0)
    except ValueError:
        return -1


class BenchError(Exception):
    pass


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


# --------------------------------------------------------------------------- load generators

@dataclass
class SourceResult:
    seconds: float
    client_cpu: float
    returncode: int
    stderr: str
    latencies: list[float] | None = None  # seconds from the final dot to the 250, per message


def run_smtp_source(port: int, sessions: int, count: int, size: int, reuse: bool,
                    timeout: float) -> SourceResult:
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-M", "bench.test", "-f", "a@example.test", "-t", "b@example.test"]
    if reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    stderr = errf.read().decode(errors="replace").strip()
    errf.close()
    return SourceResult(seconds, rusage.ru_utime + rusage.ru_stime, proc.returncode, stderr)


class ClientError(Exception):
    pass


class _Replies:
    """Reads whole SMTP replies from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self) -> tuple[int, bytes]:
        start = 0
        while True:
            end = self.buf.find(b"\r\n", start)
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ClientError("connection closed by the server")
                self.buf += chunk
                continue
            line = self.buf[start:end]
            start = end + 2
            if len(line) < 4 or line[3:4] != b"-":
                reply, self.buf = self.buf[:start], self.buf[start:]
                try:
                    return int(line[:3]), reply
                except ValueError:
                    raise ClientError(f"bad reply {reply!r}") from None

    def expect(self, code: int, what: str) -> None:
        got, reply = self.read()
        if got != code:
            raise ClientError(f"{what}: {reply.decode(errors='replace').strip()}")


def message_bytes(i: int, size: int) -> bytes:
    """A message of about *size* bytes (headers + lines of X), dot-terminated."""
    head = (f"From: <a@example.test>\r\nTo: <b@example.test>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-Id: <{os.getpid()}.{i}.{time.monotonic_ns()}@bench.test>\r\n"
            "Subject: bench\r\n\r\n").encode()
    left = max(size - len(head), 0)
    line = b"X" * 78 + b"\r\n"
    body = line * (left // len(line)) + b"X" * max(left % len(line) - 2, 0) + b"\r\n"
    return head + body + b".\r\n"


def run_python_client(port: int, count: int, size: int, reuse: bool, timeout: float) -> SourceResult:
    """One sequential client, like ``smtp-source -s 1`` (a connection per message unless
    *reuse*), timing the final dot -> 250 of every message."""
    lat: list[float] = []
    sock: socket.socket | None = None
    rc, err = 0, ""
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise ClientError(f"timed out after {i} messages")
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rd = _Replies(sock)
                rd.expect(220, "banner")
                sock.sendall(b"EHLO client.bench.test\r\n")
                rd.expect(250, "EHLO")
            data = message_bytes(i, size)
            sock.sendall(b"MAIL FROM:<a@example.test>\r\n")
            rd.expect(250, "MAIL")
            sock.sendall(b"RCPT TO:<b@example.test>\r\n")
            rd.expect(250, "RCPT")
            sock.sendall(b"DATA\r\n")
            rd.expect(354, "DATA")
            sock.sendall(data)
            t = time.perf_counter()
            rd.expect(250, "end of data")
            lat.append(time.perf_counter() - t)
            if not reuse:
                sock.sendall(b"QUIT\r\n")
                rd.expect(221, "QUIT")
                sock.close()
                sock = None
        if sock is not None:
            sock.sendall(b"QUIT\r\n")
            rd.expect(221, "QUIT")
    except (OSError, ClientError) as e:
        rc, err = 1, f"python client, message {len(lat) + 1}: {e}"
    finally:
        if sock is not None:
            sock.close()
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    return SourceResult(seconds, cpu, rc, err, latencies=lat)


def drive(args, port: int, sessions: int, count: int, size: int) -> SourceResult:
    """Send *count* messages of *size* bytes over *sessions* concurrent sessions: a
    single session with the Python client (unless --single-client smtp-source),
    several with smtp-source."""
    if sessions == 1 and args.single_client == "python":
        return run_python_client(port, count, size, args.reuse, args.timeout)
    return run_smtp_source(port, sessions, count, size, args.reuse, args.timeout)


class Driving:
    """drive() in a thread: the clock of a delivering server runs on after it is done."""

    def __init__(self, args, port: int, sessions: int, count: int, size: int) -> None:
        self.result: SourceResult | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(self, "result", drive(args, port, sessions, count, size)),
            name="driver", daemon=True)
        self._thread.start()

    def failed(self) -> SourceResult | None:
        r = self.result
        return r if r is not None and r.returncode != 0 else None

    def join(self) -> SourceResult:
        self._thread.join()
        assert self.result is not None
        return self.result


class Mta:
    """One twistd mta daemon on a fresh spool in its own directory."""

    def __init__(self, workdir: Path, port: int, max_message_size: int, extra_args: list[str],
                 tree: Path | None, guard: str, server_extra: str = "") -> None:
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
            + server_extra
            + "[policy]\n"
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


# --------------------------------------------------------------------------- cases

KINDS = {
    "accept": "acceptance only (mta: [relay] deliver = false; Postfix relays meanwhile)",
    "inbound": "inbound while delivering: accepted msg/s while both relay to the sink",
    "e2e": "end to end: delivered msg/s, until the sink has all and the queue is empty",
}


@dataclass(frozen=True)
class Case:
    kind: str  # a key of KINDS
    sessions: int
    size: int

    @property
    def mode(self) -> str:
        """What the servers do during the run: "accept" (mta queues only) or "relay"."""
        return "accept" if self.kind == "accept" else "relay"

    @property
    def name(self) -> str:
        return f"{self.kind} {case_name(self.sessions, self.size)}"


def case_name(sessions: int, size: int) -> str:
    unit = f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"
    return f"{sessions}x{unit}"


_SHAPE = re.compile(r"^(\d+)x(\d+)(KB|K|MB|M|B)?$", re.IGNORECASE)


def parse_shape(text: str) -> tuple[int, int]:
    m = _SHAPE.match(text.strip())
    if not m:
        raise ValueError(f"bad case shape {text!r} (expected SESSIONSxSIZE, e.g. 20x1KB)")
    mult = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1 << 20, "MB": 1 << 20}[(m.group(3) or "").upper()]
    return int(m.group(1)), int(m.group(2)) * mult


def parse_cases(spec: str, args) -> list[Case]:
    """``accept,inbound:1x1KB,e2e`` -> Cases; a kind alone is its default set."""
    defaults = {
        "accept": [(s, l) for l in args.size_list for s in args.session_list],
        "inbound": [(20, 1024), (1, 1024), (20, 102400)],
        "e2e": [(args.e2e_sessions, args.e2e_size)],
    }
    out: list[Case] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "all":
            items = [Case(k, s, l) for k in ("accept", "inbound", "e2e") for s, l in defaults[k]]
        else:
            kind, _, shape = item.partition(":")
            if kind not in KINDS:
                raise ValueError(f"unknown case kind {kind!r} (one of {', '.join(KINDS)}, all)")
            items = [Case(kind, *parse_shape(shape))] if shape else [Case(kind, s, l) for s, l in defaults[kind]]
        out.extend(c for c in items if c not in out)
    return out


# --------------------------------------------------------------------------- the servers

class Server(Protocol):
    name: str
    port: int
    delivers: bool  # relays to the sink during the run (its queue must drain)

    def tree(self) -> ProcTree: ...
    def queue_empty(self) -> bool: ...
    def stored(self) -> int: ...
    def tail(self) -> str: ...


class PostfixServer:
    name = "postfix"
    delivers = True

    def __init__(self, port: int) -> None:
        self.port = port

    def tree(self) -> ProcTree:
        return ProcTree(postfix_master())

    def queue_empty(self) -> bool:
        return postfix_queued() == 0

    def stored(self) -> int:
        return postfix_queued()

    def tail(self) -> str:
        return ""


class MtaServer:
    """A fresh mta daemon for one run; a context manager."""
    name = "mta"

    def __init__(self, args, case: Case, rep: int, tmp: Path) -> None:
        self.label = f"mta-{case.mode}-s{case.sessions}-l{case.size}-r{rep}"
        self.workdir = tmp / self.label
        self.workdir.mkdir()
        self.delivers = case.mode == "relay"
        extra = []
        if args.profile:
            extra = ["--profiler=cprofile", "--savestats",
                     "--profile", str(Path(args.profile_dir) / f"{self.label}.pstats")]
        self.mta = Mta(self.workdir, free_port(), max(args.max_message_size, 2 * case.size), extra,
                       args.tree_path, args.relay_guard if self.delivers else args.guard,
                       server_extra="".join(x.strip() + "\n" for x in args.server_extra.split(";")
                                            if x.strip()))
        self.port = self.mta.port
        self.keep = args.keep
        self._db: sqlite3.Connection | None = None

    def __enter__(self) -> "MtaServer":
        self.mta.start()
        self._db = sqlite3.connect(f"file:{self.mta.spool}?mode=ro", uri=True, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        if self._db is not None:
            self._db.close()
        self.mta.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def tree(self) -> ProcTree:
        return ProcTree(self.mta.pid)

    def stored(self) -> int:
        assert self._db is not None
        return self._db.execute("SELECT count(*) FROM messages").fetchone()[0]

    def queue_empty(self) -> bool:
        return self.stored() == 0

    def tail(self) -> str:
        return self.mta.tail_log()


# --------------------------------------------------------------------------- measurement

@dataclass
class Run:
    server: str
    mode: str  # Case.mode
    sessions: int
    size: int
    messages: int
    rep: int
    order: int  # 0 = ran first in its pair, 1 = second
    load1: float  # 1-minute load average just before the run
    source_seconds: float  # until the client was done (every message accepted)
    drained_seconds: float | None  # until the sink had every message and the queue was empty
    cpu_ms_per_msg: float | None
    main_thread_cpu_ms_per_msg: float | None  # main (reactor) threads alone
    sys_cpu_ms_per_msg: float | None  # the kernel's part of cpu_ms_per_msg
    cpu_seconds_measured: float  # the interval the CPU figures cover
    client_cpu_ms_per_msg: float
    machine_busy_pct: float
    proc_rss_mb: float  # the largest peak RSS of any one process
    pss_mb: float  # peak of the sum of PSS over the server's processes (sampled)
    nprocs: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    sink_conns: int | None = None  # SMTP sessions the server opened to the sink (relay runs)
    sink_sessions0: int = 0  # the sink's session count before the run
    thread_cpu_ms_per_msg: dict[int, float] = field(default_factory=dict)  # mta: by thread id
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.source_seconds

    @property
    def e2e_rate(self) -> float | None:
        return self.messages / self.drained_seconds if self.drained_seconds else None

    def value(self, kind: str) -> float | None:
        return self.e2e_rate if kind == "e2e" else self.rate


def wait_drained(sink: Sink, target: int, server: Server, driving: Driving, timeout: float,
                 what: str) -> float:
    """Wait until the sink has *target* messages in all and the server's queue is
    empty; returns perf_counter() at that moment.  Fails early if the client failed."""
    deadline = time.monotonic() + timeout
    while not sink.wait_messages(target, 0.25):
        if (r := driving.failed()) is not None:
            raise BenchError(f"client against {what} failed ({r.returncode}): {r.stderr}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the sink has {sink.messages} of {target} messages after {timeout}s")
    while not server.queue_empty():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: queue not empty after {timeout}s")
        time.sleep(0.005)
    return time.perf_counter()


def _spy_start(args, pid: int, label: str) -> subprocess.Popen | None:
    if not args.py_spy:
        return None
    out = Path(args.profile_dir) / f"{label}.pyspy.txt"
    extra = args.py_spy_args.split()
    if "--native" not in extra and "-n" not in extra:
        extra.append("--nonblocking")  # py-spy cannot do both
    spy = subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--threads",
                            "--rate", str(args.py_spy_rate), "--format", "raw", "--output", str(out),
                            *extra],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    log(f"   py-spy -> {out}")
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


def measure(args, server: Server, case: Case, count: int, rep: int, order: int,
            sink: Sink | None, label: str) -> Run:
    """One measured run of *case* against *server*, after a warm-up.  The one place
    that measures, for every case and both servers."""
    s, size = case.sessions, case.size
    if server.delivers and sink is None:
        raise BenchError("a delivering server needs the sink")
    warm = min(args.warmup, count)
    if warm:
        base = sink.messages if sink else 0
        d = Driving(args, server.port, min(s, warm), warm, size)
        if server.delivers:
            wait_drained(sink, base + warm, server, d, args.drain_timeout, f"{server.name} warm-up")
        w = d.join()
        if w.returncode != 0:
            raise BenchError(f"{server.name} warm-up failed: {w.stderr}\n{server.tail()}")
    time.sleep(0.2)
    stored0 = 0 if server.delivers else server.stored()
    tree = server.tree()
    tree.reset_peaks()
    mem = MemorySampler(tree)
    spy = _spy_start(args, tree.root, label) if server.name == "mta" else None
    load1 = os.getloadavg()[0]
    base, sess0 = (sink.messages, sink.sessions) if sink else (0, 0)
    cpu0, main0, sys0 = tree.cpu()
    th0 = tree.thread_cpu() if server.name == "mta" else {}
    busy0, tot0 = machine_cpu()
    t0 = time.perf_counter()
    driving = Driving(args, server.port, s, count, size)
    try:
        if server.delivers:
            t_end = wait_drained(sink, base + count, server, driving, args.drain_timeout, server.name)
            r = driving.join()
        else:
            r = driving.join()
            time.sleep(0.2)  # let the daemon finish closing connections
            t_end = time.perf_counter()
        cpu1, main1, sys1 = tree.cpu()
        th1 = tree.thread_cpu() if server.name == "mta" else {}
        busy1, tot1 = machine_cpu()
    except BenchError as e:
        raise BenchError(f"{e}\n{server.tail()}") from None
    finally:
        mem.stop()
        _spy_stop(spy)
    if r.returncode != 0:
        raise BenchError(f"client against {server.name} failed ({r.returncode}): {r.stderr}\n{server.tail()}")
    conns = None
    if server.delivers:
        time.sleep(0.2)
        got = sink.messages - base
        if got != count:
            raise BenchError(f"the sink received {got} messages from {server.name}, expected {count}")
        conns = sink.sessions - sess0  # final once cached connections are closed (settle_conns)
    else:
        stored = server.stored() - stored0
        if stored != count:
            raise BenchError(f"{server.name}'s spool holds {stored} new messages, expected {count}")
    lat = sorted(r.latencies) if r.latencies else None
    p50 = p99 = None
    if lat:
        p50 = 1000 * statistics.median(lat)
        p99 = 1000 * (statistics.quantiles(lat, n=100)[98] if len(lat) >= 100 else lat[-1])
    is_mta = server.name == "mta"
    return Run(server.name, case.mode, s, size, count, rep, order, load1,
               source_seconds=r.seconds,
               drained_seconds=(t_end - t0) if server.delivers else None,
               cpu_ms_per_msg=(cpu1 - cpu0) * 1000 / count,
               main_thread_cpu_ms_per_msg=(main1 - main0) * 1000 / count if is_mta else None,
               sys_cpu_ms_per_msg=(sys1 - sys0) * 1000 / count,
               cpu_seconds_measured=t_end - t0,
               client_cpu_ms_per_msg=r.client_cpu * 1000 / count,
               machine_busy_pct=100 * (busy1 - busy0) / max(tot1 - tot0, 1),
               proc_rss_mb=mem.proc_peak_kb / 1024, pss_mb=mem.pss_peak_kb / 1024,
               nprocs=mem.nprocs, p50_ms=p50, p99_ms=p99, sink_conns=conns, sink_sessions0=sess0,
               thread_cpu_ms_per_msg={t: round((c - th0.get(t, 0.0)) * 1000 / count, 3)
                                      for t, c in th1.items() if c - th0.get(t, 0.0) > 0})


def settle_conns(run: Run, sink: Sink | None, quiet: float) -> None:
    """Count the sessions a delivering server opened to the sink once its cached
    connections are closed: mta's at its stop, Postfix's after its cache timeout."""
    if sink is not None and run.sink_conns is not None:
        run.sink_conns = sink.settle_sessions(quiet) - run.sink_sessions0


def describe_run(r: Run) -> str:
    parts = [f"{r.rate:.0f} msg/s accepted in {r.source_seconds:.2f}s"]
    if r.drained_seconds:
        parts.append(f"{r.e2e_rate:.0f} msg/s delivered (drained after {r.drained_seconds:.2f}s, "
                     f"{r.sink_conns} sessions to the sink)")
    parts.append(f"CPU {fmt(r.cpu_ms_per_msg, '.3f')} ms/msg ({fmt(r.sys_cpu_ms_per_msg, '.3f')} kernel)"
                 + (f" (main threads {r.main_thread_cpu_ms_per_msg:.3f})"
                    if r.main_thread_cpu_ms_per_msg is not None else ""))
    parts.append(f"peak RSS {r.proc_rss_mb:.1f} MB/process, PSS {r.pss_mb:.1f} MB in {r.nprocs} processes")
    if r.p50_ms is not None:
        parts.append(f"dot->250 p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms")
    parts.append(f"load {r.load1:.2f}, machine busy {r.machine_busy_pct:.0f}%")
    return "; ".join(parts)


# --------------------------------------------------------------------------- report

def fmt(v: float | None, spec: str) -> str:
    if v is None:
        width = spec.split(".")[0].rstrip("dfs")
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, spec)


def _med(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


def _pairs(runs: list[Run], case: Case) -> list[tuple[int, Run | None, Run | None]]:
    mine = [r for r in runs if (r.mode, r.sessions, r.size) == (case.mode, case.sessions, case.size)]
    out = []
    for rep in sorted({r.rep for r in mine}):
        m = next((r for r in mine if r.rep == rep and r.server == "mta"), None)
        p = next((r for r in mine if r.rep == rep and r.server == "postfix"), None)
        out.append((rep, m, p))
    return out


def _lat(r: Run | None) -> str:
    if r is None or r.p50_ms is None:
        return f"{'-':>13}"
    return f"{r.p50_ms:6.2f}/{r.p99_ms:<6.2f}"


def report(runs: list[Run], cases: list[Case], args) -> str:
    lines: list[str] = []
    hdr = (f"{'rep':>3} {'msgs':>5} | {'mta msg/s':>9} {'CPU ms':>6} {'main ms':>7} {'RSS MB':>6} "
           f"{'load':>4} {'p50/p99 ms':>13} | {'Postfix msg/s':>13} {'CPU ms':>6} {'RSS MB':>6} "
           f"{'load':>4} {'p50/p99 ms':>13} | {'mta/Postfix':>11}")
    summary: list[tuple[Case, list[tuple[int, Run | None, Run | None]]]] = []
    for case in cases:
        pairs = _pairs(runs, case)
        if not pairs:
            continue
        summary.append((case, pairs))
        lines.append(f"{case.name}: {KINDS[case.kind]}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for rep, m, p in pairs:
            mv, pv = (m and m.value(case.kind)), (p and p.value(case.kind))
            ratio = mv / pv if mv and pv else None
            first = (" (mta first)" if m.order == 0 else " (Postfix first)") if m and p else ""
            lines.append(
                f"{rep + 1:>3} {(m or p).messages:>5} | {fmt(mv, '9.0f')} "
                f"{fmt(m and m.cpu_ms_per_msg, '6.3f')} {fmt(m and m.main_thread_cpu_ms_per_msg, '7.3f')} "
                f"{fmt(m and m.proc_rss_mb, '6.1f')} {fmt(m and m.load1, '4.1f')} {_lat(m)} | "
                f"{fmt(pv, '13.0f')} {fmt(p and p.cpu_ms_per_msg, '6.3f')} {fmt(p and p.proc_rss_mb, '6.1f')} "
                f"{fmt(p and p.load1, '4.1f')} {_lat(p)} | "
                + (f"{ratio:10.2f}x" if ratio is not None else f"{'-':>11}") + first)
        lines.append("")

    lines.append("Summary: medians over the pairs of this invocation (ratio = median of the pairs' "
                 "mta/Postfix msg/s, its range beside it)")
    shdr = (f"{'case':<18} {'pairs':>5} | {'mta msg/s':>9} {'CPU ms/msg':>10} {'main ms':>7} {'RSS MB':>6} "
            f"{'p50/p99 ms':>13} | {'Postfix msg/s':>13} {'CPU ms/msg':>10} {'p50/p99 ms':>13} | "
            f"{'mta/Postfix':>11} {'range':>11} | {'load':>9}")
    lines.append(shdr)
    lines.append("-" * len(shdr))
    for case, pairs in summary:
        ms = [m for _, m, _ in pairs if m]
        ps = [p for _, _, p in pairs if p]
        ratios = [m.value(case.kind) / p.value(case.kind) for _, m, p in pairs
                  if m and p and m.value(case.kind) and p.value(case.kind)]
        loads = [r.load1 for r in ms + ps]

        def lat(rs: list[Run]) -> str:
            a, b = _med([r.p50_ms for r in rs]), _med([r.p99_ms for r in rs])
            return f"{a:6.2f}/{b:<6.2f}" if a is not None else f"{'-':>13}"
        lines.append(
            f"{case.name:<18} {len(pairs):>5} | {fmt(_med([m.value(case.kind) for m in ms]), '9.0f')} "
            f"{fmt(_med([m.cpu_ms_per_msg for m in ms]), '10.3f')} "
            f"{fmt(_med([m.main_thread_cpu_ms_per_msg for m in ms]), '7.3f')} "
            f"{fmt(max((m.proc_rss_mb for m in ms), default=None), '6.1f')} {lat(ms)} | "
            f"{fmt(_med([p.value(case.kind) for p in ps]), '13.0f')} "
            f"{fmt(_med([p.cpu_ms_per_msg for p in ps]), '10.3f')} {lat(ps)} | "
            + (f"{statistics.median(ratios):10.2f}x {min(ratios):5.2f}-{max(ratios):<5.2f}"
               if ratios else f"{'-':>11} {'-':>11}")
            + (f" | {min(loads):4.1f}-{max(loads):<4.1f}" if loads else ""))
    lines.append("")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev or "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    all_loads = [r.load1 for r in runs]
    lines.append(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision {rev}"
        + (" (work tree)" if not args.rev and not args.tree else "")
        + f", {NCPU} CPUs, 1-minute load average before the runs "
        f"{min(all_loads):.1f}-{max(all_loads):.1f}.")
    lines.append(
        "msg/s: accept/inbound = messages / the client's wall time; e2e = messages / the time until "
        "the sink had them all and the server's queue was empty.  CPU ms/msg: all the server's "
        "processes and threads (and reaped children) over the run and, for a delivering server, "
        "until its queue was empty; main ms = mta's main (reactor) threads alone.  RSS MB = the "
        "largest peak RSS of one process (per worker).  p50/p99 = final dot -> 250 (1 session, "
        f"Python client).  Clients: {'smtp-source' if args.single_client == 'smtp-source' else 'Python client'} "
        "for 1 session, smtp-source otherwise, "
        + ("several messages per connection." if args.reuse else "one connection per message."))
    lines.append(
        "mta: fresh daemon and empty SQLite spool per run, [dns] nameservers on a refusing loopback "
        f"port; accept cases: {args.guard_what}; inbound/e2e: [relay] smarthost = the sink"
        + (f", [relay] {args.relay_extra.strip()}" if args.relay_extra.strip() else "")
        + (f", [server] {args.server_extra.strip()}" if args.server_extra.strip() else "") + ".  "
        "Postfix relays to the same sink in every case.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cases", default="all",
                   help="comma-separated cases: accept, inbound, e2e (their default sets), "
                   "KIND:SxSIZE (e.g. inbound:1x1KB), or all (default)")
    p.add_argument("--sessions", default="1,20", help="accept: comma-separated session counts (default 1,20)")
    p.add_argument("--sizes", default="1024,102400",
                   help="accept: comma-separated message sizes in bytes (default 1024,102400)")
    p.add_argument("-m", "--messages", type=int, default=None,
                   help="messages per run for every case (default: per case, "
                   + ", ".join(f"{m} {case_name(s, l)}={n}" for (m, s, l), n in DEFAULT_COUNTS.items()) + ")")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default message counts")
    p.add_argument("-r", "--repeat", type=int, default=1, help="pairs per case (default 1)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up messages before each measured run")
    p.add_argument("--reuse", action="store_true", help="several messages per connection (smtp-source -d)")
    p.add_argument("--single-client", choices=["python", "smtp-source"], default="python",
                   help="the client of 1-session cases (python: also times dot -> 250)")
    p.add_argument("--only", choices=["mta", "postfix", "both"], default="both")
    p.add_argument("--max-message-size", type=int, default=10 * 1024 * 1024)
    p.add_argument("--timeout", type=float, default=600, help="seconds before a client run is stopped")
    p.add_argument("--drain-timeout", type=float, default=300)
    p.add_argument("--rev", help="benchmark this git revision of mta (extracted to a temporary "
                   "directory) instead of the work tree, e.g. HEAD")
    p.add_argument("--tree", help="benchmark the mta package in this directory (a copy of the "
                   "repository) instead of the work tree")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (spools, logs)")
    p.add_argument("--json", help="also write every run as JSON to this file")
    p.add_argument("--profile", action="store_true",
                   help="run mta under twistd's cProfile (slower) and save stats in --profile-dir")
    p.add_argument("--py-spy", metavar="PATH", nargs="?", const=str(PY_SPY),
                   help="sample mta during each measured run with py-spy (default PATH: "
                   ".venv/bin/py-spy; all threads, raw collapsed stacks in --profile-dir; "
                   "summarise with bench/pyspy_top.py)")
    p.add_argument("--py-spy-args", default="", help="extra py-spy record arguments, e.g. --py-spy-args=--gil (only the thread holding the GIL) or =--idle")
    p.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--profile-dir", default="bench/profiles")
    e = p.add_mutually_exclusive_group()
    e.add_argument("--e2e", action="store_true", help="same as --cases e2e")
    e.add_argument("--no-e2e", action="store_true", help="same as --cases accept")
    p.add_argument("--e2e-sessions", type=int, default=20, help="e2e: smtp-source sessions (20)")
    p.add_argument("--e2e-size", type=int, default=1024, help="e2e: message size (1024)")
    p.add_argument("--e2e-messages", type=int, default=None,
                   help="inbound/e2e: messages per run (default per case, times --scale)")
    p.add_argument("--relay-extra", "--e2e-relay", dest="relay_extra", default="",
                   help="inbound/e2e: extra [relay] keys for mta, separated by ';', e.g. "
                   "'per_destination = 20; concurrency = 40' (default: none, the defaults)")
    p.add_argument("--server-extra", default="",
                   help="extra [server] keys for mta, separated by ';', e.g. 'workers = 2' "
                   "(default: none, the defaults)")
    args = p.parse_args(argv)
    args.session_list = [int(x) for x in args.sessions.split(",") if x]
    args.size_list = [int(x) for x in args.sizes.split(",") if x]
    spec = "e2e" if args.e2e else "accept" if args.no_e2e else args.cases
    try:
        args.case_list = parse_cases(spec, args)
    except ValueError as err:
        p.error(str(err))
    return args


def count_for(args, case: Case) -> int:
    if args.messages:
        return args.messages
    if case.mode == "relay" and args.e2e_messages:
        return args.e2e_messages
    n = DEFAULT_COUNTS.get((case.mode, case.sessions, case.size))
    if n is None:  # roughly constant bytes for large sizes, more for many sessions
        n = 1000 if case.size <= 16384 else 500
        if case.sessions > 1:
            n *= 3
    return max(1, int(n * args.scale))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit(f"bench: {tool} not found: run {POSTFIX_REFERENCE} install")
    if not TWISTD.exists():
        sys.exit(f"bench: {TWISTD} not found: run make venv")
    if args.py_spy and not os.access(args.py_spy, os.X_OK):
        sys.exit(f"bench: {args.py_spy} not found: .venv/bin/pip install py-spy")
    use_postfix = args.only in ("postfix", "both")
    use_mta = args.only in ("mta", "both")
    if use_postfix and not os.access(POSTFIX_REFERENCE, os.X_OK):
        sys.exit(f"bench: {POSTFIX_REFERENCE} not found (set MTA_POSTFIX_REFERENCE, or use --only mta)")
    if use_postfix and os.geteuid() != 0:
        sys.exit("bench: the Postfix reference needs root (or use --only mta)")
    if args.profile or args.py_spy:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    # The runs: one per (mode, sessions, size); inbound and e2e of one shape share theirs.
    run_cases: list[Case] = []
    for c in args.case_list:
        rc = Case("accept" if c.mode == "accept" else "inbound", c.sessions, c.size)
        if rc not in run_cases:
            run_cases.append(rc)
    needs_sink = use_postfix or any(c.mode == "relay" for c in run_cases)

    tmp = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    sink: Sink | None = None
    postfix_started = False
    runs: list[Run] = []
    failures: list[str] = []
    interrupted = False
    try:
        sink_port = 0
        postfix = None
        if needs_sink:
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
            while postfix_queued() != 0:
                time.sleep(0.1)
            postfix = PostfixServer(pf_port)

        args.tree_path = None
        args.guard = args.relay_guard = ""
        args.guard_what = "-"
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
            if any(c.mode == "accept" for c in run_cases):
                args.guard, args.guard_what = loopback_guard(args.tree_path, dead_port)
                log(f"accept cases: mta runs with {args.guard_what}")
            if any(c.mode == "relay" for c in run_cases):
                extra = "".join(x.strip() + "\n" for x in args.relay_extra.split(";") if x.strip())
                args.relay_guard = e2e_relay_config(args.tree_path, sink_port, dead_port, extra)

        for rep in range(args.repeat):
            for i, case in enumerate(run_cases):
                n = count_for(args, case)
                servers = (["postfix"] if use_postfix else []) + (["mta"] if use_mta else [])
                if (rep + i) % 2:
                    servers.reverse()
                for order, name in enumerate(servers):
                    what = f"{case.mode} {case_name(case.sessions, case.size)}"
                    log(f"rep {rep + 1}/{args.repeat} {what} x {n} -> {name}")
                    try:
                        if name == "mta":
                            with MtaServer(args, case, rep, tmp) as mta:
                                run = measure(args, mta, case, n, rep, order, sink, mta.label)
                            settle_conns(run, sink, 0.5)  # stopped: it QUIT its cached connections
                        else:
                            run = measure(args, postfix, case, n, rep, order, sink, "postfix")
                            if case.mode == "relay":
                                settle_conns(run, sink, 3.0)  # its connection cache lets go after 2s
                    except (BenchError, RuntimeError) as err:
                        log(f"FAILED: {err}")
                        failures.append(f"rep {rep + 1} {what} {name}: {str(err).splitlines()[0]}")
                        continue
                    log("   " + describe_run(run))
                    runs.append(run)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except (BenchError, RuntimeError, subprocess.CalledProcessError) as err:
        log(f"FAILED: {err}")
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
        print(report(runs, args.case_list, args))
    for f in failures:
        print(f"FAILED: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 1 if interrupted or failures else 0


if __name__ == "__main__":
    sys.exit(main())
