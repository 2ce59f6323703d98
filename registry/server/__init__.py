"""The registry service: SQL index of deltas per base model (SQLAlchemy; schema by the Alembic
migrations in migrations/), content-addressed blob stores (local files or S3) and the `/v1` REST
API (FastAPI). Needs the `server` extra; the client never imports it."""
