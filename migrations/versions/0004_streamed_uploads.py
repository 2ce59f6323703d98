"""Streamed pushes: an upload may be declared before its stored digest and sizes are known (they
arrive with `complete`), and bytes sent through the server are verified as they arrive, the results
recorded on the upload (raw digest and size, and which staged file they describe).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("uploads", sa.Column("received_raw_digest", sa.String(length=71), nullable=True))
    op.add_column("uploads", sa.Column("received_raw_size", sa.BigInteger(), nullable=True))
    op.add_column("uploads", sa.Column("received_token", sa.String(length=64), nullable=True))
    # Nothing references uploads, so SQLite's batch mode (a copy of this table) cascades nowhere.
    with op.batch_alter_table("uploads") as batch:
        batch.alter_column("digest", existing_type=sa.String(length=71), nullable=True)
        batch.alter_column("size", existing_type=sa.BigInteger(), nullable=True)
        batch.alter_column("raw_digest", existing_type=sa.String(length=71), nullable=True)


def downgrade() -> None:
    # Uploads declared without digests cannot be kept by the older schema; they were never visible.
    op.execute(
        "DELETE FROM versions WHERE id IN (SELECT version_id FROM uploads "
        "WHERE digest IS NULL OR size IS NULL OR raw_digest IS NULL) AND state = 'pending'"
    )
    op.execute("DELETE FROM uploads WHERE digest IS NULL OR size IS NULL OR raw_digest IS NULL")
    with op.batch_alter_table("uploads") as batch:
        batch.alter_column("digest", existing_type=sa.String(length=71), nullable=False)
        batch.alter_column("size", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("raw_digest", existing_type=sa.String(length=71), nullable=False)
        batch.drop_column("received_token")
        batch.drop_column("received_raw_size")
        batch.drop_column("received_raw_digest")
