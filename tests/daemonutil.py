"""Helpers for tests that run ``twistd`` with options of its own (``--uid``,
``--logger``, ``--logfile``) around the conftest MTADaemon."""
from __future__ import annotations

import subprocess
from typing import Any

from conftest import MTADaemon, subprocess_env, twistd_command


def use_twistd_args(daemon: MTADaemon, *args: str, env: dict[str, str] | None = None) -> MTADaemon:
    """From its next start on, *daemon* runs ``twistd -n --pidfile= ARGS mta
    --config ...`` (with *env* added to the environment)."""

    def spawn(self: Any = daemon) -> None:
        self.starts += 1
        previous = self.log()
        if previous:
            self._logs.append(previous)
        environment = subprocess_env()
        environment.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                twistd_command("-n", "--pidfile=", *args, "mta", "--config",
                               str(self.config_path)),
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=environment)
    daemon._spawn = spawn
    return daemon
