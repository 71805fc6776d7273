"""The ``mta`` admin command: a dispatcher over subcommand modules.

The server itself runs under ``twistd mta``; this command manages it.  Each
subcommand lives in its own module that provides::

    def register(subparsers) -> None:
        p = subparsers.add_parser("NAME", help="...")
        add_config_option(p)                 # --config PATH, if it needs the config
        p.set_defaults(func=run)             # run(args) -> exit status

and is listed in :data:`SUBCOMMAND_MODULES`.  A listed module that does not
exist yet is skipped (so ``mta.queuecmd`` can be added by just creating it).

Exit status: 0 success, 1 a failure (one line on stderr, ``mta: ...``),
2 a usage error (argparse).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES = (
    "mta.passwdcmd",   # mta passwd add|remove|list
    "mta.queuecmd",    # mta queue list|show|flush|delete|hold|release|requeue|bounce|stats
    "mta.sendmail",    # mta sendmail [sendmail flags] (also the `sendmail` console script)
)

DEFAULT_CONFIG = "etc/mta.toml"


class CommandError(Exception):
    """A failure to report as one line ``mta: <message>`` with exit status 1."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="PATH", default=DEFAULT_CONFIG,
                        help=f"the TOML configuration file (default {DEFAULT_CONFIG})")


def load_config(path: str):
    """The configuration, or CommandError with the config's one-line message."""
    from .config import ConfigError, load_config as _load

    try:
        return _load(path)
    except ConfigError as e:
        raise CommandError(str(e)) from None


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        print(f"mta: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
