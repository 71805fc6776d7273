"""The result of a local delivery attempt for one recipient."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LocalResult:
    """What happened to one recipient, in the form of an SMTP reply.

    ``text`` is the whole reply, "250 2.0.0 ..." or "451 4.3.1 ...".
    ``remote`` names the server whose reply ``text`` is (an LMTP server:
    "unix:/run/dovecot/lmtp"), None when we produced the result ourselves
    (a Maildir write, a connection failure): such a text must never be
    reported as something a remote MTA said (RFC 3464 §2.3.5).
    """

    code: int           # 250, 451, 452, 550, ...
    status: str         # enhanced status code (RFC 3463), "2.0.0"
    text: str           # "250 2.0.0 delivered to /var/mail/example.org/bob"
    remote: str | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def detail(self) -> str:
        """``text`` without its reply code and enhanced status."""
        head = f"{self.code} {self.status}"
        if self.text.startswith(head + " "):
            return self.text[len(head) + 1:]
        if self.text.startswith(f"{self.code} "):
            return self.text[len(str(self.code)) + 1:]
        return self.text

    @classmethod
    def make(cls, code: int, status: str, detail: str, remote: str | None = None) -> "LocalResult":
        return cls(code, status, f"{code} {status} {detail}", remote)
