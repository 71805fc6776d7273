"""Local delivery: the building blocks the local couriers are made of.

* :mod:`mta.local.maildir` writes a message into a Maildir (maildir(5)),
  blocking, to be run off the reactor thread;
* :mod:`mta.local.aliases` parses aliases(5) files and the mailboxes list,
  and expands a local name into local mailboxes and remote addresses;
* :mod:`mta.local.lmtp` hands a message to an LMTP server (RFC 2033) and
  returns one result per recipient.

:class:`mta.local.result.LocalResult` is the one result type of the three
(code, enhanced status, text, and whether the text is a server's reply);
the couriers map it to the delivery Outcome.
"""
