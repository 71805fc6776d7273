"""Who is local: the local domains, who exists there, and what a local
recipient stands for (its aliases expansion).  The one answer to "is this
delivered here, and to whom", asked by the policy at RCPT time, by the
router (which courier) and by the local courier (expansion).

Local domains: ``[local] domains`` plus ``[server] hostname`` (unless the
hostname has a ``[routes]`` entry: then the administrator sent it
elsewhere).  A bare ``postmaster`` (RFC 5321 §4.5.1) is
``postmaster@<hostname>``.

Who exists in a local domain (the RCPT-time check; 550 5.1.1 otherwise):

* ``postmaster``, always, from anyone (RFC 5321 §4.5.1);
* a name of the aliases file, or a mailbox of the ``mailboxes`` file
  (unset: every local part is a mailbox);
* with no ``[local]`` section at all: only ``postmaster`` and ``root`` at
  the hostname, the documented home of the mail the system sends to its
  administrator.

Mailboxes are delivered to ``[local] maildir`` (a template) or handed to
``[local] lmtp``; that is the local courier's business, not this module's.
"""
from __future__ import annotations

from collections.abc import Iterable

from .. import domain as dom
from .aliases import AliasTable, Expansion, MailboxList, TableUnavailable

__all__ = ["ALWAYS", "LocalDirectory", "TableUnavailable"]

# Local parts that exist in every local domain, whatever the mailboxes file says.
ALWAYS = frozenset({"postmaster"})
# Without a [local] section: the only local users, at the hostname.
SYSTEM_USERS = frozenset({"postmaster", "root"})


def _key(domain: str) -> str | None:
    try:
        return dom.to_ascii(domain)
    except dom.DomainError:
        return None


class LocalDirectory:
    """The local domains and their users.

    *domains*: the local domains besides *hostname*; *aliases* and
    *mailboxes*: paths of those files (None: no aliases; every local part
    exists); *configured*: False when there is no ``[local]`` section
    (then only SYSTEM_USERS exist, at the hostname).  Files are re-read when
    they change (mta.local.aliases); a file that cannot be read raises
    :class:`TableUnavailable` (temporary) from :meth:`exists` and makes an
    expansion fail temporarily.
    """

    def __init__(self, *, hostname: str, domains: Iterable[str] = (),
                 aliases: str | None = None, mailboxes: str | None = None,
                 configured: bool = True, routed: Iterable[str] = ()) -> None:
        self.hostname = dom.to_ascii(hostname) if _key(hostname) else hostname.lower()
        keys = {k for k in (_key(d) for d in domains) if k}
        if self.hostname not in {_key(r) for r in routed}:
            keys.add(self.hostname)
        self.domains = frozenset(keys)
        self.configured = configured
        self._mailboxes = MailboxList(mailboxes or None, normalize_domain=self._norm)
        self._aliases = AliasTable(aliases or None, is_local=self.is_local,
                                   normalize_domain=self._norm)

    @staticmethod
    def _norm(domain: str) -> str:
        return _key(domain) or domain.lower()

    def is_local(self, domain: str) -> bool:
        """Is *domain* (any form; "" = the bare postmaster's) delivered here?"""
        if not domain:
            return self.hostname in self.domains
        if dom.is_literal(domain):
            return False
        return _key(domain) in self.domains

    def exists(self, local_part: str, domain: str) -> bool:
        """May mail for ``local_part@domain`` (a local domain) be accepted?
        Raises TableUnavailable when a file cannot be read now."""
        name = local_part.lower()
        if name in ALWAYS:
            return True
        if not self.configured:
            return name in SYSTEM_USERS and self._norm(domain or self.hostname) == self.hostname
        return (self._aliases.lookup(local_part) is not None
                or self._mailboxes.exists(local_part, domain or self.hostname))

    def _mailbox_exists(self, local_part: str, domain: str) -> bool:
        if local_part.lower() in ALWAYS or not self.configured:
            return True
        return self._mailboxes.exists(local_part, domain)

    def expand(self, local_part: str, domain: str) -> Expansion:
        """What ``local_part@domain`` stands for: local mailboxes and remote
        addresses (its aliases, recursively; a name with no alias is its own
        mailbox).  A mailbox that does not exist is a problem 5.1.1."""
        return self._aliases.expand(local_part, domain or self.hostname,
                                    exists=self._mailbox_exists)
