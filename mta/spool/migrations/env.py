"""Alembic's environment for the spool: Alembic runs this file (by its
path) for mta.spool.schema.prepare; the work is
:func:`mta.spool.migrations.run_env`.  Imported as a module (mta.usercheck
checks that the daemon's user can), it does nothing."""
from __future__ import annotations

if __name__ != "mta.spool.migrations.env":
    from mta.spool.migrations import run_env

    run_env()
