"""Private Dovecot instances for tests: ``dovecot -c CONF`` in a temporary
directory, LMTP only, a passwd-file userdb, Maildirs under the directory.

::

    with DovecotLMTP(tmp_dir, users=["bob", "carol"]) as dc:
        dc.socket      # the LMTP unix socket
        dc.port        # the LMTP loopback port
        dc.maildir("bob")

Debian's dovecot-core and dovecot-lmtpd provide it (tests/setup-deps).
Mail is stored as ``nobody`` (Dovecot refuses root); the master runs as
root with its own base_dir and state_dir, so it never touches the system
instance.  Nothing sleeps a fixed time: start-up polls for the socket.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

DOVECOT = "/usr/sbin/dovecot"
LMTP = "/usr/lib/dovecot/lmtp"
NOBODY = 65534


class DovecotLMTP:
    def __init__(self, root: Path, users: list[str]):
        missing = [p for p in (DOVECOT, LMTP) if not os.access(p, os.X_OK)]
        if missing:
            pytest.fail(f"missing {', '.join(missing)}: run tests/setup-deps as root "
                        "(it installs dovecot-core and dovecot-lmtpd)")
        assert os.geteuid() == 0, "Dovecot's master must start as root here"
        self.root = root
        self.users = users
        self.run = root / "run"
        self.mail = root / "mail"
        self.log = root / "dovecot.log"
        self.conf = root / "dovecot.conf"
        self.socket = str(self.run / "lmtp")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def _write(self) -> None:
        for d in (self.root, self.run, self.root / "state"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, NOBODY, NOBODY)
        (self.root / "users").write_text("".join(
            f"{u}::{NOBODY}:{NOBODY}::{self.mail / u}::\n" for u in self.users))
        self.conf.write_text(f"""\
protocols = lmtp
base_dir = {self.run}
state_dir = {self.root / 'state'}
instance_name = mta-test-{os.getpid()}-{self.port}
log_path = {self.log}
ssl = no
listen = 127.0.0.1
first_valid_uid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = username_format=%n {self.root / 'users'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {self.root / 'users'}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
""")

    def start(self, timeout: float = 20.0) -> "DovecotLMTP":
        self._write()
        # -F: stay in the foreground, so the Popen is the master.
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                pytest.fail(f"dovecot exited ({self.proc.returncode}): {out}\n{self.log_text()}")
            if os.path.exists(self.socket) and self._port_open():
                return self
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dovecot did not start in {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "DovecotLMTP":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
