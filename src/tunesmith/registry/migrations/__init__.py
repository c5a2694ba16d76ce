"""Alembic migrations of the registry schema; `store.open_registry` runs `upgrade head` on open."""
