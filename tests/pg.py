"""A real PostgreSQL for the tests: one private server per test session,
started on first use and stopped at the end of the session.

* ``pg_server`` (session scope) -- ``initdb`` + ``pg_ctl start`` into a
  fresh temporary directory, run as an unprivileged user (``postgres`` when
  the tests run as root, else the current user), listening only on a Unix
  socket in that directory (``listen_addresses = ''``), trust
  authentication for the superuser ``mta``.  Its ``create_database()``
  makes an empty database and answers its SQLAlchemy URL
  (``postgresql+psycopg://mta@/NAME?host=DIR``); ``restart()`` stops and
  starts the server (a database that goes away under load).
* ``pg_url`` -- a new, empty database for one test (dropped afterwards).

No mocked database: when the server binaries are missing (Debian's
``postgresql``, which tests/setup-deps installs) the test fails with what to
install -- it is never skipped.  Durability settings are off (``fsync``):
the tests kill mta processes, never the database server.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

SUPERUSER = "mta"
START_TIMEOUT = 60


def server_bindir() -> str | None:
    """The directory of Debian's ``initdb``/``pg_ctl`` (the newest version),
    or of those on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(on_path))
    return None


class PostgresServer:
    """A private PostgreSQL server in *base* (see the module docstring)."""

    def __init__(self, bindir: str, base: Path):
        self.bindir = bindir
        self.base = base                     # also the Unix socket's directory
        self.data = base / "data"
        self.log = base / "server.log"
        self._user: str | None = None
        self._n = 0
        self._lock = threading.Lock()
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
                self._user = "postgres"
            except KeyError:
                self._user = "nobody"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a server program (as the server's user)."""
        kw: dict = {}
        if self._user is not None:
            kw = {"user": self._user, "group": pwd.getpwnam(self._user).pw_gid}
        res = subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], cwd=self.base,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=START_TIMEOUT, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()}")
        return res

    def init(self) -> None:
        # The directory must be usable by the server's user; the socket in it by us.
        os.chmod(self.base, 0o755)
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.base}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.base}"

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(host=str(self.base), user=SUPERUSER, dbname="postgres",
                             autocommit=True) as c:
            c.execute(sql)

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        with self._lock:
            self._n += 1
            name = f"mta_test_{os.getpid()}_{self._n}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("/")[-1].split("?")[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bindir = server_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: the PostgreSQL "
                    "spool tests need Debian's postgresql package -- run tests/setup-deps "
                    "(as root) or apt-get install postgresql", pytrace=False)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[test]' (or 'mta[postgresql]')",
                    pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="mta-pg-"))
    server = PostgresServer(bindir, base)
    try:
        server.init()
        server.start()
    except Exception as e:
        log = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"cannot start a private PostgreSQL in {base}: {e}\n{log}", pytrace=False)
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    try:
        yield url
    finally:
        try:
            pg_server.drop_database(url)
        except Exception:
            pass


@pytest.fixture(params=["sqlite", "postgresql"], name="url")
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``url``: a spool URL, once a new SQLite file and once a new PostgreSQL
    database (the tests of the spool run on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mta.sqlite'}"
    return request.getfixturevalue("pg_url")
