"""What a sysadmin sees when starting and stopping the real daemon (issue 8,
section 6 and the ``--uid`` part of section 1):

* under ``twistd --uid nobody`` (as root) a spool, a module or a file the
  user cannot use stops startup with one line, checked as that user;
* configuration edge cases: no listener, absurd numbers, a ``unix:``
  listener in a missing directory;
* the log: one start and one stop line, a second SIGTERM during a stop is
  one line, no Twisted chatter per DNS query;
* the shipped ``etc/mta.toml`` says why a first message waits.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import ROOT, MTADaemon, free_port, wait_for
from daemonutil import python_for_user, use_twistd_args

import mta

needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root (to switch to nobody)")


def run_to_exit(daemon: MTADaemon, timeout: float = 60.0) -> tuple[int, str]:
    """Start *daemon* expecting it to stop by itself during startup."""
    daemon.port = free_port()
    daemon.write_config()
    daemon._spawn()
    assert daemon.proc is not None
    status = daemon.proc.wait(timeout)
    return status, daemon.log()


def one_error_line(log: str) -> str:
    """The single ``mta: ...`` line of a failed startup (and no traceback)."""
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.startswith("mta: ")]
    assert len(lines) == 1, log
    return lines[0]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="mta-ops-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


NOBODY = ("--uid", "nobody", "--gid", "nogroup")


# --------------------------------------------------------------------------- --uid checks

@needs_root
def test_uid_spool_directory_not_writable_by_the_user_stops_startup(mta_factory, open_dir):
    # The spool's directory holds another file, so it is not handed to
    # nobody (only the database is): SQLite, as nobody, cannot create its
    # -wal/-shm files there.  As root the check passed and the daemon
    # started; every 250 would then have failed.
    spool_dir = open_dir / "spool"
    spool_dir.mkdir(mode=0o755)
    (spool_dir / "other-file").write_text("not the spool\n")
    daemon = mta_factory(start=False, spool=spool_dir / "mta.sqlite")
    use_twistd_args(daemon, *NOBODY, python=python_for_user())
    status, log = run_to_exit(daemon)
    assert status == 1, log
    line = one_error_line(log)
    assert line.startswith("mta: as uid 65534 gid "), line
    assert f"[spool] url: sqlite:///{spool_dir}/mta.sqlite: cannot use spool:" in line
    assert "writable by this user" in line


@needs_root
def test_uid_spool_the_user_cannot_reach_stops_startup(mta_factory):
    # The spool under pytest's tmp_path (mode 700, root's): chowning the
    # file and its directory does not let nobody through the parents.
    daemon = mta_factory(start=False)
    use_twistd_args(daemon, *NOBODY, python=python_for_user())
    status, log = run_to_exit(daemon)
    assert status == 1, log
    line = one_error_line(log)
    assert f"[spool] url: {daemon.spool_url}: cannot create spool directory " in line, line
    assert "Permission denied" in line


@needs_root
def test_uid_module_the_user_cannot_import_stops_startup(mta_factory, open_dir):
    # The mta package in a directory of mode 700 (as in a virtualenv built
    # from a Python under /root): as root at startup everything imports; as
    # nobody, the modules the daemon imports later (inside functions, at
    # the first delivery or bounce) cannot be read.  The old daemon started
    # and accepted mail, then failed every delivery result.
    lib = open_dir / "lib"
    shutil.copytree(Path(mta.__file__).parent, lib / "mta",
                    ignore=shutil.ignore_patterns("__pycache__"))
    lib.chmod(0o700)
    spool_dir = open_dir / "spool"
    spool_dir.mkdir()
    daemon = mta_factory(start=False, spool=spool_dir / "mta.sqlite")
    use_twistd_args(daemon, *NOBODY, env={"PYTHONPATH": str(lib)}, python=python_for_user())
    status, log = run_to_exit(daemon)
    assert status == 1, log
    line = one_error_line(log)
    assert re.search(rf"cannot (import mta\.\S+|run `[^`]+`) \({re.escape(str(lib))}/mta/", line), line
    assert "ModuleNotFoundError" in line and "readable by this user" in line


@needs_root
def test_uid_tls_key_unreadable_by_the_user_stops_startup(mta_factory, open_dir):
    # Root reads the key at startup, but SIGHUP re-reads it as nobody: a
    # key of mode 600 would make every reload fail.
    from tlsutil import self_signed
    cert, key = self_signed("mx.e2e.test").write(open_dir / "tls")    # key: mode 600, root
    (open_dir / "tls").chmod(0o755)
    cert.chmod(0o644)
    daemon = mta_factory(start=False, spool=open_dir / "spool" / "mta.sqlite",
                         extra=f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
    use_twistd_args(daemon, *NOBODY, python=python_for_user())
    status, log = run_to_exit(daemon)
    assert status == 1, log
    line = one_error_line(log)
    assert line.endswith(f"[tls] private_key: {key}: cannot read: Permission denied"), line


@needs_root
def test_uid_checks_pass_when_everything_is_usable(mta_factory, open_dir):
    spool_dir = open_dir / "spool"
    users = open_dir / "users"
    users.write_text("")
    users.chmod(0o644)
    daemon = mta_factory(start=False, spool=spool_dir / "mta.sqlite",
                         extra=f'[auth]\nusers_file = "{users}"\n')
    use_twistd_args(daemon, *NOBODY, python=python_for_user())
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.sendmail("a@origin.test", ["b@dest.test"], b"Subject: 1\r\n\r\none\r\n")
    assert daemon.count() == 1
    assert re.search(r"startup checks as uid 65534 gid \d+ passed", daemon.log())


# --------------------------------------------------------------------------- configuration edge cases

def write_config(tmp_path: Path, server: dict, relay: dict | None = None) -> Path:
    from conftest import toml_text
    config = tmp_path / "mta.toml"
    config.write_text(toml_text({
        "server": server,
        "spool": {"url": f"sqlite:///{tmp_path}/spool/mta.sqlite"},
        "relay": relay or {"deliver": False},
        "dns": {"nameservers": ["127.0.0.1:9"]}}))
    return config


def test_unix_listener_in_a_missing_directory_is_one_line(twistd, tmp_path):
    config = write_config(tmp_path, {"listen": [f"unix:{tmp_path}/no/such/dir/smtp.sock"]})
    done = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1, out
    assert "Traceback" not in out, out
    assert done.stderr.decode() == (
        f"mta: {config}: [server] listen: unix:{tmp_path}/no/such/dir/smtp.sock: cannot listen: "
        f"No such file or directory (directory {tmp_path}/no/such/dir does not exist)\n")


def test_no_listener_and_no_delivery_is_refused(twistd, tmp_path):
    config = write_config(tmp_path, {"listen": []})
    done = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"mta: {config}: [server] listen and submission are empty and [relay] deliver = false: "
        "this daemon would neither accept nor deliver mail\n")


def test_no_listener_says_so_and_delivers_the_queue(tmp_path):
    # listen = [] is a delivery-only daemon (as a Postfix without smtpd in
    # master.cf): mail comes from sendmail, the daemon delivers the queue.
    config = write_config(tmp_path, {"listen": []}, relay={"deliver": True})
    with running(config, tmp_path) as log:
        text = log()
        assert (f"{config}: no [server] listen or submission endpoints: accepting no mail over "
                "SMTP, only delivering the queue (what sendmail puts there)") in text
        assert "started: listening on nothing; spool" in text


@contextlib.contextmanager
def running(config: Path, directory: Path) -> Iterator[Callable[[], str]]:
    """``twistd -n mta --config CONFIG`` until its start line; yields a
    function returning its log so far; SIGTERM and a clean exit at the end."""
    from conftest import subprocess_env, twistd_command
    log_path = directory / "twistd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(twistd_command("-n", "--pidfile=", "mta", "--config", str(config)),
                                cwd=directory, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=subprocess_env())
    log = lambda: log_path.read_text(errors="replace")     # noqa: E731
    try:
        wait_for(lambda: " started: " in log() or proc.poll() is not None, 30, "the start line")
        assert proc.poll() is None, log()
        yield log
    finally:
        proc.terminate()
        status = proc.wait(30)
    assert status in (0, -15), log()
    assert "Traceback" not in log(), log()


def test_shipped_config_queues_a_first_message_and_says_why(tmp_path):
    # `make run`: a first message to example.test used to go to MX routing
    # through the system resolver and sit deferred for 5 minutes.  The
    # shipped etc/mta.toml accepts and queues it, and the start line says
    # that nothing is delivered.  (Addresses, spool and users file swapped
    # for temporary ones; DNS pinned to a dead loopback port in any case.)
    import tomllib
    from test_examples import dump_toml
    data = tomllib.loads((ROOT / "etc" / "mta.toml").read_text())
    port, submission = free_port(), free_port()
    data["server"]["listen"] = [f"tcp:{port}:interface=127.0.0.1"]
    data["server"]["submission"] = [f"tcp:{submission}:interface=127.0.0.1"]
    data["spool"]["url"] = f"sqlite:///{tmp_path}/spool/mta.sqlite"
    data["auth"]["users_file"] = str(tmp_path / "users")
    data.setdefault("dns", {})["nameservers"] = ["127.0.0.1:9"]
    config = tmp_path / "mta.toml"
    config.write_text(dump_toml(data))
    with running(config, tmp_path) as log:
        assert "; not delivering ([relay] deliver = false)" in log(), log()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("me@localhost.test", ["you@example.test"], b"Subject: hi\r\n\r\nfirst\r\n")
        wait_for(lambda: "nrcpt=1" in log(), 15, "the accept line")
    assert " to=<you@example.test>" not in log()          # no delivery attempt
    from conftest import MTADaemon
    rows = MTADaemon(tmp_path / "x", spool=tmp_path / "spool" / "mta.sqlite").rows(
        "SELECT address, state, attempts FROM recipients")
    assert [tuple(r) for r in rows] == [("you@example.test", "queued", 0)]


# --------------------------------------------------------------------------- the log

def mta_lines(log: str) -> list[str]:
    """The messages of mta's own log lines ([mta#...] namespace only)."""
    return [line.split("] ", 1)[1] for line in log.splitlines() if re.search(r" \[mta#\w+\] ", line)]


def test_start_and_stop_lines(mta_factory):
    daemon = mta_factory()
    assert daemon.stop() in (0, -15)
    lines = mta_lines(daemon.log())
    assert lines == [
        f"mta {mta.__version__} started: listening on tcp:{daemon.port}:interface=127.0.0.1; "
        f"spool {daemon.spool_url}; not delivering ([relay] deliver = false)",
        "mta stopping",
        "mta stopped"], daemon.log()


def test_second_sigterm_during_a_stop_is_one_line(mta_factory):
    # A next hop that accepts the connection and never greets: the delivery
    # is in progress at SIGTERM, and the stop waits shutdown_grace for it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        daemon = mta_factory(extra=(
            f'[relay]\nshutdown_grace = "20s"\n[routes]\n"dest.test" = "127.0.0.1:{port}"\n'))
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
            s.sendmail("a@origin.test", ["b@dest.test"], b"Subject: 1\r\n\r\none\r\n")
        silent.settimeout(30)
        conn, _ = silent.accept()          # the delivery has started
        with conn:
            daemon.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "mta stopping" in daemon.log(), 15, "the stop to begin")
            daemon.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "SIGTERM: already stopping" in daemon.log(), 15, "the second SIGTERM")
            assert daemon.running()        # still waiting for the delivery
            daemon.proc.send_signal(signal.SIGINT)
            wait_for(lambda: "SIGINT: already stopping" in daemon.log(), 15, "the SIGINT")
        assert daemon.proc.wait(30) in (0, -15)
    log = daemon.log()
    assert "ReactorNotRunning" not in log and "Traceback" not in log, log
    assert mta_lines(log)[-1] == "mta stopped"
    # Closing the connection ended the delivery (deferred); nothing left in flight.
    assert [r[0] for r in daemon.rows("SELECT state FROM recipients")] == ["deferred"]


def test_dns_lookups_leave_no_twisted_chatter_in_the_log(mta_factory, dns_factory):
    dns = dns_factory()
    daemon = mta_factory(extra=f'[relay]\ndeliver = true\n[dns]\nnameservers = ["127.0.0.1:{dns}"]\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.sendmail("a@nxdomain-sender.test", ["b@nxdomain.test"], b"Subject: 1\r\n\r\none\r\n")
    # The message bounces (NXDOMAIN), and so does its bounce: two lookups.
    wait_for(lambda: daemon.log().count("status=bounced") == 2, 30, "two bounces")
    log = daemon.log()
    assert "nxdomain.test/MX: NXDOMAIN" in log
    for chatter in ("DNSDatagramProtocol starting on", "UDP Port", "Starting protocol",
                    "Stopping protocol"):
        assert chatter not in log, log


# --------------------------------------------------------------------------- units

def test_the_import_check_covers_function_level_imports():
    from mta.usercheck import check_imports, daemon_imports
    checks = daemon_imports()
    statements = {(c.statement, c.module) for c in checks}
    # Imported inside functions, i.e. only after the switch to --uid.
    assert ("from twisted.names import hosts, resolve", "mta.delivery.router") in statements
    assert ("from ..dsn import OriginalMessage, build_dsn, needs_smtputf8",
            "mta.delivery.reports") in statements
    assert ("import mta.dsn", "mta.dsn") in statements
    check_imports(checks)          # all of them work here, as this user


def test_the_import_check_names_what_fails(tmp_path):
    from mta.usercheck import Problem, check_imports, daemon_imports
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("def f():\n    from . import missing\n")
    checks = daemon_imports(str(pkg), "pkg")
    assert [c.statement for c in checks] == ["import pkg", "import pkg.mod", "from . import missing"]
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(Problem) as e:
            check_imports(checks)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "pkg" or n.startswith("pkg.")]:
            del sys.modules[name]
    assert str(e.value).startswith(f"cannot run `from . import missing` ({pkg}/mod.py): ImportError: ")


def test_dns_chatter_filter():
    from twisted.logger import LogPublisher
    from twisted.python.log import LogPublisher as LegacyPublisher
    from mta.logging import quiet_dns_chatter
    seen: list[dict] = []
    publisher = LogPublisher(seen.append)
    assert quiet_dns_chatter(publisher)
    legacy = LegacyPublisher(publisher, publisher)
    for text in ["DNSDatagramProtocol starting on 17466",
                 "Starting protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f90279a9490>",
                 "(UDP Port 17466 Closed)",
                 "Stopping protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f90279a9490>",
                 "smtp starting on 2525", "(TCP Port 2525 Closed)"]:
        legacy.msg(text)
    assert [e["log_text"] for e in seen] == ["smtp starting on 2525", "(TCP Port 2525 Closed)"]
