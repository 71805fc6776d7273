"""Under ``twistd --uid/--gid`` (started as root): check, as the target user,
everything the daemon will need after twistd switches to it, so that a
spool, a module or a file that user cannot use stops startup with one line
instead of failing later, one delivery or one AUTH at a time.

twistd calls ``privilegedStartService`` and then switches user
(``twisted.scripts._twistd_unix.UnixApplicationRunner.startApplication``:
``privilegedStartService()``, then ``shedPrivileges()``).  The check runs in
``privilegedStartService``: a forked child switches to the user exactly as
twistd will (``twisted.python.util.switchUID``), runs the checks, and
reports the first problem back over a pipe.  Forking keeps the child's
state identical to the daemon's after the switch: the same ``sys.path``,
the same modules already imported (those need nothing more), the same
working directory.

What is checked:

* every import statement in the ``mta`` package, function-level ones
  included (those run after the switch), and the codecs the code uses by
  name (``"idna"``: its module is loaded on first use) -- a virtualenv built
  from a Python under ``/root``, or a package directory of mode 700, is
  found here;
* the spool opens for writing (SQLite creates its ``-wal``/``-shm`` files
  in the spool's directory, so that must be writable too);
* files read after the switch: the TLS certificate and key (SIGHUP), the
  users file (re-read when it changes).
"""
from __future__ import annotations

import ast
import codecs
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ImportCheck", "Problem", "daemon_imports", "run_as_user", "check_imports", "check_readable"]

#: Codecs looked up by name in the code (``str.encode("idna")`` and the like).
CODECS = ("idna", "latin-1", "ascii", "utf-8")


class Problem(Exception):
    """What the target user cannot do; ``str()`` is one line."""


@dataclass(frozen=True)
class ImportCheck:
    statement: str     # e.g. "from twisted.names import hosts, resolve"
    package: str       # the package relative imports resolve against
    module: str        # the module whose source holds the statement
    path: str          # that source file (for the error message)


def daemon_imports(package_dir: str | None = None, package: str = "mta") -> list[ImportCheck]:
    """Every import statement in the package's source (module level and
    inside functions), plus an import of each of its modules.  Imports of a
    top-level package that is not installed at all (an optional dependency
    behind ``except ImportError``) are left out: they fail as root too."""
    if package_dir is None:
        import mta
        package_dir = os.path.dirname(os.path.abspath(mta.__file__))
    checks: list[ImportCheck] = []
    seen: set[tuple[str, str]] = set()
    installed: dict[str, bool] = {}

    def present(name: str) -> bool:
        top = name.partition(".")[0]
        if top not in installed:
            try:
                installed[top] = importlib.util.find_spec(top) is not None
            except (ImportError, ValueError):
                installed[top] = False
        return installed[top]

    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, package_dir)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            module = ".".join([package, *rel])
            pkg = module if name == "__init__.py" else module.rpartition(".")[0]
            todo = [f"import {module}"]
            try:
                with open(path, "rb") as f:
                    tree = ast.parse(f.read(), path)
            except (OSError, SyntaxError, ValueError):
                tree = None
            for node in ast.walk(tree) if tree is not None else ():
                if isinstance(node, ast.Import):
                    if all(present(a.name) for a in node.names):
                        todo.append(ast.unparse(node))
                elif isinstance(node, ast.ImportFrom):
                    if node.module == "__future__":
                        continue
                    if node.level == 0 and not present(node.module or ""):
                        continue
                    todo.append(ast.unparse(node))
            for statement in todo:
                key = (statement, pkg if "from ." in statement else "")
                if key in seen:
                    continue
                seen.add(key)
                checks.append(ImportCheck(statement, pkg, module, path))
    return checks


def check_imports(checks: Iterable[ImportCheck], codec_names: Iterable[str] = CODECS) -> None:
    """Run each import statement as the daemon would; raise Problem on the first that fails."""
    for c in checks:
        try:
            exec(c.statement, {"__name__": c.module, "__package__": c.package})
        except Exception as e:
            if c.statement == f"import {c.module}":
                what = f"cannot import {c.module} ({c.path})"
            else:
                what = f"cannot run `{c.statement}` ({c.path})"
            raise Problem(f"{what}: {_reason(e)} (the Python installation and every "
                          "module the daemon uses must be readable by this user)") from None
    for name in codec_names:
        try:
            codecs.lookup(name)
        except Exception as e:
            raise Problem(f"cannot load the {name!r} codec: {_reason(e)}") from None


def check_readable(path: str, what: str) -> None:
    """*path* can be opened and read (a missing file is not a problem here)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return
    except OSError as e:
        raise Problem(f"{what}: {path}: cannot read: {e.strerror or e}") from None


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_as_user(uid: int | None, gid: int | None, checks: Sequence[Callable[[], None]], *,
                euid: bool = False) -> str | None:
    """Fork; in the child switch to *uid*/*gid* as twistd will, run *checks*
    in order and report the first :class:`Problem` (or any other exception)
    back over a pipe.  Returns that one line, or None when all passed."""
    from twisted.python.util import switchUID

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the child
        status = 0
        try:
            os.close(read_end)
            try:
                switchUID(uid, gid, euid)
                for check in checks:
                    check()
            except Problem as e:
                status, text = 1, str(e)
            except BaseException as e:
                status, text = 1, _reason(e)
            if status:
                os.write(write_end, text.encode("utf-8", "replace")[:4000])
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as f:
        while True:
            data = f.read(4096)
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if text:
        return " ".join(text.split())
    if status != 0:
        return f"the startup check as uid {uid} gid {gid} failed (wait status {status})"
    return None
