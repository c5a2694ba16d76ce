"""Alembic environment: runs on the connection that `store.migrate` opened (always online, never --sql).

On PostgreSQL a transaction-scoped advisory lock serialises concurrent first opens, so two processes creating
the schema at once do not collide; on SQLite the caller's `BEGIN IMMEDIATE` does the same.
"""

from __future__ import annotations

from alembic import context

from tunesmith.registry.schema import Base

MIGRATION_LOCK_KEY = 7_415_530_801  # arbitrary constant shared by every tunesmith client

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
