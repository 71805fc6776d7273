"""Alembic's environment for the spool, run by mta.spool.schema.prepare: the
migrations run on its connection, in its transaction (which it commits),
never offline."""
from __future__ import annotations

from alembic import context

from mta.spool.schema import metadata

if context.is_offline_mode():
    raise RuntimeError("the spool's migrations run only on a connection "
                       "(mta.spool.schema.prepare)")

context.configure(connection=context.config.attributes["connection"],
                  target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():     # the caller's transaction: no commit here
    context.run_migrations()
