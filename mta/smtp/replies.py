"""SMTP replies and enhanced status codes (RFC 5321, RFC 3463) in one place.

A :class:`Reply` is what the server says; :class:`SMTPReplyError` carries one
out of code that decides to refuse something, so the protocol maps every
refusal to the wire in a single place.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str | None  # enhanced status code "X.Y.Z", or None
    text: str

    def encode(self, enhanced: bool) -> bytes:
        """Wire form; multi-line text becomes ``code-`` continuation lines."""
        prefix = f"{self.status} " if (enhanced and self.status) else ""
        if "\n" not in self.text:           # nearly every reply: one line
            return f"{self.code} {prefix}{self.text}\r\n".encode("utf-8", "replace")
        lines = self.text.split("\n")
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def __str__(self) -> str:
        return f"{self.code} {self.status + ' ' if self.status else ''}{self.text}"


class SMTPReplyError(Exception):
    """An exception that carries the SMTP reply to send."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


def R(code: int, status: str | None, text: str) -> Reply:
    return Reply(code, status, text)


# Fixed replies used by the server.
OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Ok")
RCPT_OK = R(250, "2.1.5", "Ok")
DATA_GO = R(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = R(221, "2.0.0", "Bye")
HELP = R(214, "2.0.0",
         "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\n"
         "See RFC 5321")
VRFY_CANNOT = R(252, "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = R(502, "5.5.1", "EXPN command not available")
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
TURN_REFUSED = R(502, "5.5.1", "TURN not implemented: use ETRN or ATRN")
UNKNOWN_COMMAND = R(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")
BAD_CHARS = R(500, "5.5.2", "Invalid characters in command")
NEED_HELO = R(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = R(503, "5.5.1", "Sender already specified")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command")
NO_VALID_RCPT = R(554, "5.5.1", "No valid recipients")
DATA_AFTER_BDAT = R(503, "5.5.1", "DATA not allowed after BDAT in one transaction")
BINARYMIME_DATA = R(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")
TOO_MANY_RCPTS = R(452, "4.5.3", "Too many recipients")
MSG_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
# A refusal of the content after the final dot or BDAT LAST, like BARE_NEWLINE:
# 554 is the end-of-data "transaction failed" reply (RFC 5321 §4.3.2), 5.6.0 a
# media problem (RFC 3463).  500 is for an over-long command line (§4.5.3.1.4);
# §4.5.3.1.6 only sets the 1000-octet limit of text lines.
TEXT_LINE_TOO_LONG = R(554, "5.6.0",
                       "Message refused: text line longer than 1000 octets (RFC 5321 4.5.3.1.6)")
BARE_NEWLINE = R(554, "5.6.0",
                 "Message refused: bare CR or LF in message data (RFC 5321 2.3.8)")
SPOOL_FAILED = R(451, "4.3.0", "Local error in processing: message not queued, try again later")
INSUFFICIENT_STORAGE = R(452, "4.3.1", "Insufficient system storage")
TIMEOUT = R(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors")
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = R(421, "4.7.0", "Too many connections from your address, try again later")
SHUTTING_DOWN = R(421, "4.3.2", "Service shutting down")
RELAY_DENIED = R(554, "5.7.1", "Relay access denied")
STARTTLS_UNAVAILABLE = R(502, "5.5.1", "STARTTLS not available")
READY_TO_START_TLS = R(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = R(503, "5.5.1", "TLS already active")
TLS_TEMP_UNAVAILABLE = R(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_UNAVAILABLE = R(503, "5.5.1", "Authentication not enabled")
ENCRYPTION_REQUIRED = R(538, "5.7.11",
                        "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required")
AUTH_OK = R(235, "2.7.0", "Authentication successful")
AUTH_INVALID = R(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMP_FAILURE = R(454, "4.7.0", "Temporary authentication failure")
AUTH_TOO_MANY_FAILURES = R(454, "4.7.0", "Too many authentication failures, try again later")
ETRN_UNAVAILABLE = R(502, "5.5.1", "ETRN not available")
# ETRN (RFC 1985 section 5): the reply texts are the RFC's.
ETRN_SYNTAX = R(500, "5.5.2", "Syntax Error: ETRN domain, @domain or #queue")
ETRN_IN_TRANSACTION = R(503, "5.5.1", "ETRN not allowed inside a mail transaction")
ATRN_UNAVAILABLE = R(502, "5.5.1", "ATRN not available")
NON_ASCII_ADDRESS = R(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")


def etrn_bad_argument(arg: str) -> Reply:
    return R(501, "5.5.4", f"Syntax Error in Parameters: {arg!r} is not a domain name")


def etrn_unable(node: str, why: str) -> Reply:
    return R(458, "4.3.0", f"Unable to queue messages for node {node}: {why}")


def etrn_not_allowed(node: str) -> Reply:
    return R(459, "4.7.1", f"{node}: not allowed")


def etrn_queuing(node: str) -> Reply:
    return R(250, "2.0.0", f"OK, queuing for node {node} started")


def etrn_no_messages(node: str) -> Reply:
    return R(251, "2.0.0", f"OK, no messages waiting for node {node}")


def etrn_pending(node: str, messages: int) -> Reply:
    return R(253, "2.0.0", f"OK, {messages} pending messages for node {node} started")
