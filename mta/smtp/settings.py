"""The settings of the protocol layer: what the SMTP server and client need
to know, with their defaults -- defined here, once.

The protocol layer (``mta/smtp/``) knows nothing of configuration files:
it takes these frozen dataclasses in its constructors.  ``mta/config.py``
is built on them, not beside them: its ``[server]`` section
(``ServerConfig``) *is* a :class:`ServerSettings` (plus the listeners), and
its ``[relay]`` timeouts take their defaults from :class:`Timeouts` and are
turned into one with :meth:`Timeouts.from_relay`.  So a default lives in
one place, and the value the daemon runs with is the value the config
validated (``tests/test_settings_defaults.py`` checks both).

Standard library only: ``mta.config`` (and so ``sendmail``, the queue CLI)
imports this module without pulling in Twisted.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

__all__ = ["ServerSettings", "Timeouts"]


@dataclass(frozen=True)
class ServerSettings:
    """The SMTP server's limits, one field per ``[server]`` key (README
    "Configuration"; RFC 5321 §4.5.3.2.7: 5 minutes for a command)."""
    hostname: str = field(default_factory=socket.getfqdn)
    max_message_size: int = 36700160  # bytes, announced with SIZE; 0 = unlimited
    max_recipients: int = 1000        # per transaction (452 4.5.3 beyond)
    max_connections: int = 1000
    max_connections_per_client: int = 50
    command_timeout: float = 300.0    # seconds idle while waiting for a command
    data_timeout: float = 300.0       # seconds idle while receiving DATA/BDAT content
    max_errors: int = 20
    bare_newlines: str = "reject"     # "reject" or "normalize"
    max_hops: int = 50                # Received lines before a message counts as looping


@dataclass(frozen=True)
class Timeouts:
    """The SMTP client's timeouts: RFC 5321 §4.5.3.2 defaults, in seconds."""
    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0             # EHLO, HELO, STARTTLS, the TLS handshake, RSET
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    idle: float = 10.0              # how long a cached connection is kept
    quit: float = 30.0              # waiting for the reply to QUIT

    @classmethod
    def from_relay(cls, *, connect: float, command: float, data: float) -> Timeouts:
        """The timeouts for ``[relay] connect_timeout``, ``command_timeout`` and
        ``data_timeout``: ``command`` for the greeting, EHLO, MAIL and RCPT;
        ``data`` after the final dot; the DATA command and each block of
        content wait at most ``command``/``data`` but never longer than RFC
        5321's 2 and 3 minutes."""
        return cls(connect=connect, greeting=command, helo=command, mail=command,
                   rcpt=command, data_init=min(command, cls.data_init),
                   data_block=min(data, cls.data_block), data_end=data)
