"""SMTP protocol code: the inbound server (and, later, the relay client)."""
