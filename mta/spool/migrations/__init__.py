"""The spool's Alembic migrations: ``versions/`` holds one revision per
schema version (revision ``0001`` is schema 1, ``0002`` schema 2, ...), and
``env.py`` runs them on the connection mta.spool.schema.prepare gives it.

Nothing here is run by hand: there is no ``alembic.ini``.
:func:`mta.spool.schema.prepare` builds the Alembic configuration in
process (``script_location`` is this directory), on SQLite and PostgreSQL
alike (``render_as_batch``: SQLite's ALTER TABLE through Alembic's batch
mode).  A new schema version is a new file in ``versions/`` whose
``down_revision`` is the previous head, and ``SCHEMA_VERSION`` in
mta.spool.schema raised to it; the tables there are the head's.
"""
from __future__ import annotations

import os

#: Alembic's ``script_location``: this package's directory (works installed).
LOCATION = os.path.dirname(os.path.abspath(__file__))


def revision(version: int) -> str:
    """The revision id of schema *version*."""
    return f"{version:04d}"
