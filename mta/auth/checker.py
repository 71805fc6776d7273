"""``twisted.cred`` glue: a checker over the users file, a realm, a portal.

The SMTP server only sees a :class:`~twisted.cred.portal.Portal`: it calls
``portal.login(UsernamePassword(user, password), None, IMailUser)`` (PLAIN,
LOGIN) or ``portal.login(cram, None, IMailUser)`` with a
:class:`~twisted.cred.credentials.CramMD5Credentials` carrying challenge,
user name and hex digest (CRAM-MD5, checked against the stored HMAC-MD5
states, never a plaintext), and gets
a Deferred that fires with ``(IMailUser, avatar, logout)`` or fails with
:class:`~twisted.cred.error.UnauthorizedLogin`.  Another store of users (a
database, LDAP) would be another checker behind the same portal.

Hash checks cost tens of milliseconds of CPU by design, so they run on a
small thread pool of their own (not the reactor's default pool, which DNS
uses), started and stopped with the service tree by :class:`AuthPool`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from .passwords import (HashError, dummy_verify, dummy_verify_cram_md5, verify_cram_md5,
                        verify_password)
from .users import UsersFile

__all__ = ["IMailUser", "MailUser", "UsersFileChecker", "MailRealm", "AuthPool", "make_portal"]

log = Logger(namespace="mta.auth")

Runner = Callable[..., defer.Deferred]


class IMailUser(Interface):
    """An authenticated user of the submission service."""
    username = Attribute("The name the user logged in with (str).")


@implementer(IMailUser)
class MailUser:
    def __init__(self, username: str):
        self.username = username

    def __repr__(self) -> str:
        return f"MailUser({self.username!r})"


@implementer(portal.IRealm)
class MailRealm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple:
        if IMailUser not in interfaces:
            raise NotImplementedError("only IMailUser avatars are provided")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        return IMailUser, MailUser(name), lambda: None


class AuthPool(service.Service):
    """A small thread pool for password checks, tied to the service tree."""

    def __init__(self, reactor: Any, size: int = 2):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name="mta-auth")

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def _username(raw: bytes | str | None) -> str | None:
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return raw


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """Checks IUsernamePassword credentials against a :class:`UsersFile`,
    and CRAM-MD5 ones (:class:`~twisted.cred.credentials.CramMD5Credentials`,
    the only IUsernameHashedPassword accepted) against its CRAM-MD5 secrets.

    *run* calls a function off the reactor thread and returns a Deferred
    (``AuthPool.run``); tests pass one that runs it inline.
    """
    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, users: UsersFile, run: Runner):
        self.users = users
        self._run = run

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        username = _username(creds.username)
        if isinstance(creds, credentials.CramMD5Credentials):
            return self._run(self._check_cram, username, creds.challenge, creds.response)
        if not credentials.IUsernamePassword.providedBy(creds):
            return defer.fail(error.UnhandledCredentials("only passwords and CRAM-MD5"))
        return self._run(self._check, username, creds.password)

    def _check_cram(self, username: str | None, challenge: bytes, response: bytes) -> str:
        stored = self.users.lookup_cram_md5(username) if username else None
        if stored is None:
            # Unknown user, or one without a CRAM-MD5 secret.
            dummy_verify_cram_md5(challenge, response)
            raise error.UnauthorizedLogin("no such user with a CRAM-MD5 secret")
        try:
            ok = verify_cram_md5(stored, challenge, response)
        except HashError as e:  # cannot happen for lines the parser accepted
            log.error("{path}: user {user!r}: unusable CRAM-MD5 secret: {error}",
                      path=self.users.path, user=username, error=str(e))
            ok = False
        if not ok:
            raise error.UnauthorizedLogin("bad CRAM-MD5 response")
        return username

    def _check(self, username: str | None, password: bytes | str) -> str:
        # Runs on the worker thread: stat/re-read the file, then the hash.
        stored = self.users.lookup(username) if username else None
        if stored is None:
            dummy_verify(password)
            raise error.UnauthorizedLogin("no such user")
        try:
            ok = verify_password(password, stored)
        except HashError as e:  # cannot happen for lines the parser accepted
            log.error("{path}: user {user!r}: unusable hash: {error}", path=self.users.path,
                      user=username, error=str(e))
            ok = False
        if not ok:
            raise error.UnauthorizedLogin("bad password")
        return username


def make_portal(users: UsersFile, run: Runner) -> portal.Portal:
    return portal.Portal(MailRealm(), [UsersFileChecker(users, run)])
