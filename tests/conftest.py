"""Shared fixtures for the end-to-end tests: the real daemon (``twistd -n mta``)
on a free loopback port with a temporary SQLite spool.

* ``mta`` — a started daemon with the default test configuration; a test can
  change it with ``@pytest.mark.mta_config(server={...}, policy={...}, extra="...")``.
* ``mta_factory`` — ``mta_factory(server=..., policy=..., extra=..., spool=...,
  spool_options=...)``
  starts more daemons (or one configured inside the test).
* ``twistd`` — ``twistd(*args)`` runs ``twistd ...`` to completion (startup
  errors, ``--help``) and returns the CompletedProcess.
* ``pg_server`` (session scope) and ``pg_url``, tests/pg.py — a private
  PostgreSQL and an empty database on it (its SQLAlchemy URL).
* ``postfix_factory`` (module scope, tests/postfix.py) — private Postfix
  instances (``postfix -c DIR``), the reference peer for interop tests.

Daemons are stopped at teardown and their log is printed (pytest shows it when
a test fails).  A daemon whose log shows a traceback fails the test at teardown
unless the test set ``daemon.expect_errors = True``.

Nothing here sleeps for a fixed time: every wait polls against a deadline.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ports import free_port

from pg import pg_server, pg_url  # noqa: F401  (fixtures: a private PostgreSQL, a database)
from postfix import postfix_factory  # noqa: F401  (fixture: private Postfix instances)
from waiting import wait_for  # noqa: F401  (re-exported: tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mta_config(server=None, policy=None, extra='', host='127.0.0.1'): "
        "configuration of the `mta` fixture")


def twistd_command(*args: str) -> list[str]:
    if TWISTD.exists():
        return [str(TWISTD), *args]
    return [sys.executable, "-m", "twisted", *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"          # the log is complete even after kill -9
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


class MTADaemon:
    """One ``twistd -n mta`` process with its own config file and spool (a
    SQLite file, or *url*: a database, e.g. ``pg_url``'s, that several
    daemons may share)."""

    def __init__(self, directory: Path, *, server: dict | None = None, policy: dict | None = None,
                 extra: str = "", spool: Path | None = None, hostname: str = "mx.e2e.test",
                 host: str = "127.0.0.1", url: str | None = None,
                 spool_options: dict | None = None):
        self.directory = directory
        self.host = host              # loopback address to listen on: 127.0.0.1 or ::1
        directory.mkdir(parents=True, exist_ok=True)
        self.server_options = dict(server or {})
        self.policy_options = dict(policy or {})
        self.spool_options = dict(spool_options or {})   # [spool] keys besides url
        self.extra = extra
        self.hostname = hostname
        self.spool = Path(spool) if spool is not None else directory / "spool" / "mta.sqlite"
        self.url = url
        self.config_path = directory / "mta.toml"
        self.log_path = directory / "twistd.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.expect_errors = False
        self.starts = 0
        self._logs: list[str] = []

    # -- configuration --------------------------------------------------------
    @property
    def spool_url(self) -> str:
        return self.url or f"sqlite:///{self.spool}"

    def write_config(self) -> None:
        if ":" in self.host:
            listen = f"tcp6:{self.port}:interface=" + self.host.replace(":", "\\:")
        else:
            listen = f"tcp:{self.port}:interface={self.host}"
        server = {"hostname": self.hostname, "listen": [listen]}
        server.update(self.server_options)
        sections: dict[str, dict[str, Any]] = {"server": server}
        if self.policy_options:
            sections["policy"] = self.policy_options
        sections["spool"] = {"url": self.spool_url, **self.spool_options}
        # Tests never reach outside loopback: no delivery unless a test asks
        # for it, and never the system resolver.
        if "[relay]" not in self.extra:
            sections["relay"] = {"deliver": False}
        if "[dns]" not in self.extra:
            sections["dns"] = {"nameservers": ["127.0.0.1:9"]}
        self.config_path.write_text(toml_text(sections) + "\n" + self.extra + "\n")

    # -- process ----------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> "MTADaemon":
        """Start the daemon (on a new free port) and wait until it greets."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for attempt in range(3):
            self.port = free_port(self.host)
            self.write_config()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                continue
        raise AssertionError(f"could not find a free port for mta:\n{self.log()}")

    def _spawn(self) -> None:
        self.starts += 1
        previous = self.log()
        if previous:
            self._logs.append(previous)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                twistd_command("-n", "--pidfile=", "mta", "--config", str(self.config_path)),
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=subprocess_env())
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                text = self.log()
                if "Address already in use" in text:
                    raise _PortTaken()
                raise AssertionError(f"mta exited with status {code} during startup:\n{text}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    s.settimeout(5)
                    banner = s.recv(512)
                if banner.startswith(b"220 "):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mta did not accept connections within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not go.  Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mta did not stop within {timeout}s of SIGTERM:\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9, and wait until the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> "MTADaemon":
        self.stop()
        return self.start()

    # -- inspection -------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        parts = self._logs + [self.log()]
        return "\n----- restart -----\n".join(p for p in parts if p)

    def rows(self, sql: str, params: Any = ()) -> list[Any]:
        """Run a query on the spool with the stdlib sqlite3 module (rows by
        index and by column name), or, for a *url* spool, with SQLAlchemy
        (``?`` placeholders all the same)."""
        if self.url is not None:
            return _url_rows(self.url, sql, params)
        conn = sqlite3.connect(f"file:{self.spool}?mode=ro", uri=True, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def execute(self, sql: str, params: Any = ()) -> None:
        """Change the spool behind the daemon's back (tests of failure paths)."""
        if self.url is not None:
            _url_rows(self.url, sql, params)
            return
        conn = sqlite3.connect(self.spool, timeout=30)
        try:
            conn.execute(sql, params)
            conn.commit()
        finally:
            conn.close()

    def count(self, table: str = "messages") -> int:
        return self.rows(f"SELECT COUNT(*) FROM {table}")[0][0]


class _PortTaken(Exception):
    pass


class _Row(tuple):
    """A result row by index and by column name, as sqlite3.Row."""
    names: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)


def _url_rows(url: str, sql: str, params: Any = ()) -> list[Any]:
    from sqlalchemy import create_engine
    engine = create_engine(url)
    try:
        if engine.dialect.paramstyle in ("format", "pyformat"):
            sql = sql.replace("%", "%%").replace("?", "%s")
        with engine.begin() as conn:
            res = conn.exec_driver_sql(sql, tuple(params))
            if not res.returns_rows:
                return []
            names = tuple(res.keys())
            out = []
            for r in res:
                row = _Row(r)
                row.names = names
                out.append(row)
            return out
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- next hops and DNS

class LoopbackPeer:
    """A scripted SMTP next hop (``tests/peers.py``) in a subprocess, on any
    loopback address (127.0.0.x, so MX hosts can differ by address and share
    one port).  ``transactions()`` are the finished transactions it recorded."""

    def __init__(self, script: dict | None, record: Path, *, interface: str = "127.0.0.1",
                 port: int = 0, program: Path | None = None):
        self.program = program or ROOT / "tests" / "peers.py"   # or a script that wraps it
        self.script = dict(script or {})
        self.record = record
        self.interface = interface
        self.port_wanted = port
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.expect_violations = False

    def start(self) -> "LoopbackPeer":
        self.spawn()
        return self.wait_started()

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(self.program), "--script", json.dumps(self.script),
             "--record", str(self.record), "--interface", self.interface,
             "--port", str(self.port_wanted)],
            stdout=subprocess.PIPE, text=True, env=subprocess_env())

    def wait_started(self) -> "LoopbackPeer":
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()     # the peer prints it once it listens
        if not line.startswith("PORT "):
            self.stop()
            raise AssertionError(f"peer did not start on {self.interface}: {line!r}")
        self.port = int(line.split()[1])
        return self

    @property
    def address(self) -> str:
        """``host:port`` for [routes] and smarthost."""
        port = self.port or self.port_wanted
        return f"[{self.interface}]:{port}" if ":" in self.interface else \
            f"{self.interface}:{port}"

    def _records(self) -> list[dict]:
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        # The last line may be half written.
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def transactions(self) -> list:
        from peers import Transaction
        return [Transaction.from_json(d["transaction"]) for d in self._records()
                if d.get("kind") == "transaction"]

    def violations(self) -> list[str]:
        return [d["violation"] for d in self._records() if d.get("kind") == "violation"]

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None


class PeerFactory:
    """``peer_factory(script, interface="127.0.0.1", port=0)`` starts one scripted
    next hop; ``peer_factory.several(script1, script2, ...)`` starts several at
    once (in parallel: each is a Python process)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.peers: list[LoopbackPeer] = []
        self._pending: list[LoopbackPeer] = []

    def new(self, script: dict | None = None, **kw: Any) -> LoopbackPeer:
        """A peer not started yet (``spawn()`` then ``wait_started()``)."""
        peer = LoopbackPeer(script, self.directory / f"peer{len(self.peers)}.jsonl", **kw)
        self.peers.append(peer)
        return peer

    def __call__(self, script: dict | None = None, **kw: Any) -> LoopbackPeer:
        return self.new(script, **kw).start()

    def several(self, *scripts: dict | None, **kw: Any) -> list[LoopbackPeer]:
        peers = [self.new(script, **kw) for script in scripts]
        for peer in peers:
            peer.spawn()
        return [peer.wait_started() for peer in peers]

    def spawn(self, *scripts: dict | None, **kw: Any) -> list[LoopbackPeer]:
        """Start peers on ports chosen now, without waiting for them, so that
        ``address`` can go into a daemon's configuration while they start;
        ``ready()`` waits for them (before anything is sent their way)."""
        peers = []
        for script in scripts:
            peer = self.new(script, port=free_port(kw.get("interface", "127.0.0.1")), **kw)
            peer.spawn()
            peers.append(peer)
        self._pending.extend(peers)
        return peers

    def ready(self) -> None:
        pending, self._pending = self._pending, []
        for peer in pending:
            peer.wait_started()


@pytest.fixture
def peer_factory(tmp_path: Path) -> Iterator[PeerFactory]:
    """Scripted next hops (see PeerFactory); all are stopped at teardown, and a
    peer that saw a protocol violation fails the test (unless
    ``peer.expect_violations = True``)."""
    factory = PeerFactory(tmp_path)

    yield factory

    problems = []
    for peer in factory.peers:     # all at once: each takes a moment to go
        if peer.proc is not None and peer.proc.poll() is None:
            peer.proc.terminate()
    for peer in factory.peers:
        peer.stop()
        bad = peer.violations()
        if bad and not peer.expect_violations:
            problems.append(f"peer {peer.address}: protocol violations: {bad}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def dns_factory(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """``dns_factory(records=[...])`` runs the test DNS server (tests/dnsserver.py,
    zone ``test.`` plus *records*) on 127.0.0.1 and returns its port."""
    from dnsserver import spawn_dns_server
    procs: list[subprocess.Popen] = []

    def make(records: list[str] = ()) -> int:
        port, proc = spawn_dns_server(tmp_path, records=list(records))
        procs.append(proc)
        return port

    yield make

    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (we run as root), unmounted at teardown -- after the
    daemons: this fixture is requested before mta_factory."""
    directory = tmp_path / "smallfs"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)],
                   check=True, capture_output=True)
    yield directory
    if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


@pytest.fixture
def mta_factory(tmp_path: Path) -> Iterator[Callable[..., MTADaemon]]:
    daemons: list[MTADaemon] = []

    def make(*, start: bool = True, **kw: Any) -> MTADaemon:
        daemon = MTADaemon(tmp_path / f"mta{len(daemons)}", **kw)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make

    stop_daemons(daemons)


def stop_daemons(daemons: list, label: Callable[[Any], str] = lambda d: str(d.config_path)
                 ) -> None:
    """The teardown of every fixture that runs daemons: stop each, print its
    log, and fail the test if one logged a traceback (unless it
    ``expect_errors``) or used a non-loopback nameserver."""
    problems = []
    for daemon in daemons:
        try:
            status = daemon.stop()
        except AssertionError as e:
            problems.append(str(e))
            status = None
        text = daemon.all_logs()
        print(f"===== {label(daemon)} (exit status {status}) =====")
        print(text)
        if (not getattr(daemon, "expect_errors", False)
                and any(m in text for m in _TRACEBACK_MARKERS)):
            problems.append(f"{label(daemon)}: the daemon logged a traceback (see its log above)")
        for m in re.finditer(r"Resolver added \('([^']*)'", text):
            if not m.group(1).startswith(("127.", "::1")):
                problems.append(f"{label(daemon)}: the daemon used a non-loopback "
                                f"nameserver {m.group(1)}: tests must stay on loopback")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def mta(request: pytest.FixtureRequest, mta_factory: Callable[..., MTADaemon]) -> MTADaemon:
    marker = request.node.get_closest_marker("mta_config")
    kw = dict(marker.kwargs) if marker else {}
    return mta_factory(**kw)


@pytest.fixture
def twistd(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(twistd_command(*args), cwd=tmp_path, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=subprocess_env())
    return run
