"""The spool's schema revisions (see mta.spool.migrations)."""
