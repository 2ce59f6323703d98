"""Idempotent `complete`: versions.upload_id records the upload a version was published from, so
completing that upload again returns the same version instead of publishing a second one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column and an index: SQLite adds both in place, without copying the table.
    op.add_column("versions", sa.Column("upload_id", sa.String(length=32), nullable=True))
    op.create_index(op.f("ix_versions_upload_id"), "versions", ["upload_id"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_versions_upload_id"), table_name="versions")
    # Not in batch mode: on SQLite (3.35+) a plain DROP COLUMN, never a copy of the table, whose
    # DROP would cascade to the tags and uploads that reference it.
    op.drop_column("versions", "upload_id")
