"""The spool's Alembic migrations: ``versions/`` holds one revision per
schema version (revision ``0001`` is schema 1, ``0002`` schema 2, ...), and
``env.py`` runs them (:func:`run_env`) on the connection
mta.spool.schema.prepare gives it.  The revision files are named
``vNNNN_*.py``: importable modules, as every module of the package is.

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
#: Alembic's version table, named for mta (not ``alembic_version``): a
#: PostgreSQL database shared with another application that uses Alembic
#: keeps both.
VERSION_TABLE = "mta_alembic_version"


def revision(version: int) -> str:
    """The revision id of schema *version*."""
    return f"{version:04d}"


def run_env() -> None:
    """What ``env.py`` does when Alembic runs it: the migrations on the
    connection mta.spool.schema.prepare put in the configuration's
    attributes, in its transaction (which prepare's caller commits), never
    offline."""
    from alembic import context

    if context.is_offline_mode():
        raise RuntimeError("the spool's migrations run only on a connection "
                           "(mta.spool.schema.prepare)")
    attributes = context.config.attributes     # given by prepare (no import back up)
    context.configure(connection=attributes["connection"],
                      target_metadata=attributes["metadata"], render_as_batch=True,
                      version_table=VERSION_TABLE)
    with context.begin_transaction():     # the caller's transaction: no commit here
        context.run_migrations()
