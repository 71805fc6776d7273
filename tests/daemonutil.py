"""Helpers for tests that run ``twistd`` with options of its own (``--uid``,
``--logger``, ``--logfile``) around the conftest MTADaemon."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from conftest import MTADaemon, subprocess_env, twistd_command

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
_readable: dict[str, str] = {}


def use_twistd_args(daemon: MTADaemon, *args: str, env: dict[str, str] | None = None,
                    python: str | None = None) -> MTADaemon:
    """From its next start on, *daemon* runs ``twistd -n --pidfile= ARGS mta
    --config ...`` (with *env* added to the environment, and under the
    interpreter *python* when given)."""

    def spawn(self: Any = daemon) -> None:
        self.starts += 1
        previous = self.log()
        if previous:
            self._logs.append(previous)
        environment = subprocess_env()
        environment.update(env or {})
        rest = ["-n", "--pidfile=", *args, "mta", "--config", str(self.config_path)]
        command = [python, "-c", _TWISTD, *rest] if python else twistd_command(*rest)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=environment)
    daemon._spawn = spawn
    return daemon


def _usable_by(python: str, user: str) -> bool:
    probe = "import secrets, email.mime.text, sqlalchemy, twisted.names.client, mta.tap, mta.dsn"
    try:
        return subprocess.run([python, "-c", probe], user=user, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def python_for_user(user: str = "nobody") -> str:
    """An interpreter that *user* can run with this project's packages, for
    tests that start the daemon with ``twistd --uid`` (which checks, as
    that user, that everything can be imported).  The test interpreter
    itself when the user can read it; else a virtualenv (made once per run)
    from the system's Python of the same version, whose site-packages are
    the test virtualenv's -- the case of a virtualenv built from a Python
    under /root, which the user cannot read."""
    if user in _readable:
        return _readable[user]
    if _usable_by(sys.executable, user):
        _readable[user] = sys.executable
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = shutil.which(f"python{version}", path="/usr/local/bin:/usr/bin:/bin")
    if base is None:
        raise AssertionError(f"{user} cannot read {sys.executable} and there is no system "
                             f"python{version} to build a virtualenv {user} can use")
    directory = Path(tempfile.mkdtemp(prefix="mta-python-"))
    atexit.register(shutil.rmtree, directory, True)
    venv = directory / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "mta-tests.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    for root, dirs, files in os.walk(directory):
        for name in dirs + files + [""]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o055 if os.path.isdir(path)
                         else os.stat(path).st_mode | 0o044)
    if not _usable_by(python, user):
        raise AssertionError(f"{user} cannot use the virtualenv {venv} either (are the test "
                             f"virtualenv's packages in {ours} readable by {user}?)")
    _readable[user] = python
    return python
