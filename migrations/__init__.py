"""Alembic environment and versions of the registry schema (the only way the schema changes)."""
