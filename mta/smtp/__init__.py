"""SMTP protocol code: the inbound server and the outbound client, and the
types they take and give; nothing of delivery, configuration or SQL."""
