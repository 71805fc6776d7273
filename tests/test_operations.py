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

import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

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
