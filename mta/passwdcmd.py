"""``mta passwd``: manage the users file named by ``[auth] users_file``.

::

    mta passwd add USER [--password-stdin] [--cram-md5] [--config PATH]
    mta passwd remove USER [--config PATH]
    mta passwd list [--config PATH]

The configuration is ``--config PATH``, else ``$MTA_CONFIG``, else
``etc/mta.toml``, as for the other subcommands (:func:`mta.cli.config_path`).

``add`` creates the user or changes an existing user's password; the
password is read from the terminal (twice) or, with ``--password-stdin``,
as the first line of standard input.  With ``--cram-md5`` the user's
CRAM-MD5 secret is stored as well (the HMAC-MD5 states, not the password:
:mod:`mta.auth.passwords`), so the user can also AUTH CRAM-MD5; without it
any CRAM-MD5 secret the user had is dropped, since it belongs to the old
password.  Changes are atomic (see
:mod:`mta.auth.users`); a running daemon notices them at the next AUTH.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from .cli import CommandError, add_config_option, load_config

MAX_PASSWORD = 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("passwd", help="manage the users who may AUTH",
                              description="Manage the users file ([auth] users_file).")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    a = sub.add_parser("add", help="add a user, or change a user's password")
    a.add_argument("user")
    a.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    a.add_argument("--cram-md5", action="store_true",
                   help="also store the CRAM-MD5 secret (HMAC-MD5 states, not the password), "
                        "so that the user can AUTH CRAM-MD5")
    add_config_option(a)
    a.set_defaults(func=run_add)

    r = sub.add_parser("remove", help="remove a user")
    r.add_argument("user")
    add_config_option(r)
    r.set_defaults(func=run_remove)

    ls = sub.add_parser("list", help="list the users, one per line")
    add_config_option(ls)
    ls.set_defaults(func=run_list)


def _users_file(args: argparse.Namespace) -> str:
    config = load_config(args.config)
    if not config.auth.users_file:
        raise CommandError(f"{config.path}: [auth] users_file is not set")
    return config.auth.users_file


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        if not sys.stdin.isatty():
            raise CommandError("no terminal to ask for the password: use --password-stdin")
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password again: ")
        except EOFError:
            raise CommandError("no password given") from None
        if password != again:
            raise CommandError("the passwords do not match")
    if not password:
        raise CommandError("empty password")
    if len(password) > MAX_PASSWORD:
        raise CommandError(f"password longer than {MAX_PASSWORD} characters")
    if any(c in password for c in "\0\r\n"):
        raise CommandError("password contains NUL, CR or LF")
    return password


def run_add(args: argparse.Namespace) -> int:
    from .auth.passwords import cram_md5_secret, hash_password
    from .auth.users import Entry, UsersFileError, edit_users_file, valid_username

    why = valid_username(args.user)
    if why is not None:
        raise CommandError(f"{args.user!r}: {why}")
    path = _users_file(args)
    password = _read_password(args)
    hashed = hash_password(password)     # before taking the lock: it takes a while
    cram = cram_md5_secret(password) if args.cram_md5 else None
    new = Entry.for_user(args.user, hashed, cram)
    outcome = []

    def change(entries: list[Entry]) -> bool:
        for i, e in enumerate(entries):
            if e.user == args.user:
                entries[i] = new
                outcome.append("changed password of")
                return True
        entries.append(new)
        outcome.append("added")
        return True

    try:
        edit_users_file(path, change)
    except UsersFileError as e:
        raise CommandError(str(e)) from None
    with_cram = " (with a CRAM-MD5 secret)" if cram is not None else ""
    print(f"{path}: {outcome[0]} user {args.user}{with_cram}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from .auth.users import Entry, UsersFileError, edit_users_file

    path = _users_file(args)
    found = []

    def change(entries: list[Entry]) -> bool:
        keep = [e for e in entries if e.user != args.user]
        if len(keep) == len(entries):
            return False
        found.append(True)
        entries[:] = keep
        return True

    try:
        edit_users_file(path, change)
    except UsersFileError as e:
        raise CommandError(str(e)) from None
    if not found:
        raise CommandError(f"{path}: no such user: {args.user}")
    print(f"{path}: removed user {args.user}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from .auth.users import UsersFileError, read_users_file

    path = _users_file(args)
    try:
        entries, problems = read_users_file(path)
    except UsersFileError as e:
        raise CommandError(str(e)) from None
    for p in problems:
        print(f"mta: warning: {p}", file=sys.stderr)
    for e in entries:
        if e.user is not None:
            print(e.user)
    return 0
