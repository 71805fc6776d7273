"""The ``mta`` admin command: a dispatcher over subcommand modules.

The server itself runs under ``twistd mta``; this command manages it.  Each
subcommand lives in its own module that provides::

    def register(subparsers) -> None:
        p = subparsers.add_parser("NAME", help="...")
        add_config_option(p)                 # --config PATH, if it needs the config
        p.set_defaults(func=run)             # run(args) -> exit status

and is listed in :data:`SUBCOMMAND_MODULES`.  A listed module that does not
exist yet is skipped (so ``mta.queuecmd`` can be added by just creating it).

The configuration file is ``--config PATH``, else ``$MTA_CONFIG``, else
``etc/mta.toml`` for every subcommand: :func:`config_path` decides.

Exit status: 0 success, 1 a failure (one line on stderr, ``mta: ...``),
2 a usage error (argparse, or an argument that is not UTF-8 text).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

SUBCOMMAND_MODULES = (
    "mta.passwdcmd",   # mta passwd add|remove|list
    "mta.queuecmd",    # mta queue list|show|flush|delete|hold|release|requeue|bounce|stats
    "mta.sendmail",    # mta sendmail [sendmail flags] (also the `sendmail` console script)
)

DEFAULT_CONFIG = "etc/mta.toml"
CONFIG_ENV = "MTA_CONFIG"


class CommandError(Exception):
    """A failure to report as one line ``mta: <message>`` with exit status 1."""


def config_path(given: str | None = None) -> str:
    """Which configuration file: *given* (``--config``), else ``$MTA_CONFIG``,
    else ``etc/mta.toml``.  The one place that decides it, for ``mta ...``
    and ``sendmail`` alike."""
    return given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def add_config_option(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """``--config PATH``; left as *default* (None: see :func:`config_path`)
    when not given.  ``argparse.SUPPRESS`` for a subcommand whose parent
    parser has the option too, so that ``mta queue --config X list`` keeps X."""
    parser.add_argument("--config", "-c", metavar="PATH", default=default,
                        help=f"the TOML configuration file (default ${CONFIG_ENV}, "
                        f"else {DEFAULT_CONFIG})")


def load_config(path: str | None = None):
    """The configuration (*path*, or as :func:`config_path` says), or
    CommandError with the config's one-line message."""
    from .config import ConfigError, load_config as _load

    try:
        return _load(config_path(path))
    except ConfigError as e:
        raise CommandError(str(e)) from None


def is_text(value: str) -> bool:
    """False for an argument that was not UTF-8 on the command line (Python
    hands its bytes over as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(value: str) -> str:
    """An argument as the user typed it, undecodable bytes as ``\\xNN``."""
    try:
        raw = os.fsencode(value)
    except UnicodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# Arguments that name files: any bytes will do.
_PATH_ARGUMENTS = frozenset({"config"})


def non_text_argument(args: argparse.Namespace) -> str | None:
    """The first argument (other than a file name) that is not UTF-8 text."""
    for name, value in vars(args).items():
        if name in _PATH_ARGUMENTS:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str) and not is_text(v):
                return v
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta", description="Manage the mta mail transfer agent "
        "(the server itself runs as: twistd -n mta --config etc/mta.toml).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


EXIT_BROKEN_PIPE = 141      # 128 + SIGPIPE, as a shell reports a tool that ``head`` left


def output_gone() -> int:
    """Standard output was closed by its reader (``mta queue list | head``):
    stop quietly, as ``ls`` would, rather than with a traceback (also the
    one Python would print flushing stdout at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "checks_own_arguments", False):
        bad = non_text_argument(args)
        if bad is not None:
            print(f"mta: argument '{shown(bad)}' is not valid UTF-8 text", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return output_gone()


if __name__ == "__main__":
    raise SystemExit(main())
