"""Initial schema: bases, repositories, versions, tags, blobs, uploads, tokens, audit events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 21:16:33.143864
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_index(op.f("ix_audit_events_target"), "audit_events", ["target"])
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=71), nullable=False),
        sa.Column("architecture", sa.String(length=128), nullable=True),
        sa.Column("parameter_count", sa.BigInteger(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_index(op.f("ix_base_models_fingerprint"), "base_models", ["fingerprint"])
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("store_key", sa.String(length=512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("raw_digest", sa.String(length=71), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("size >= 0 AND raw_size >= 0", name=op.f("ck_blobs_sizes_non_negative")),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_table(
        "repositories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("next_version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("visibility IN ('public', 'private')", name=op.f("ck_repositories_visibility")),
        sa.CheckConstraint("next_version >= 1", name=op.f("ck_repositories_next_version_positive")),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_repositories_base_model_id_base_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_repositories")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_repositories_namespace_name")),
    )
    op.create_index(op.f("ix_repositories_base_model_id"), "repositories", ["base_model_id"])
    op.create_index(op.f("ix_repositories_name"), "repositories", ["name"])
    op.create_table(
        "token_scopes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("permission", sa.String(length=16), nullable=False),
        sa.CheckConstraint(
            "permission IN ('read', 'write', 'admin')", name=op.f("ck_token_scopes_permission")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name=op.f("fk_token_scopes_token_id_api_tokens"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_token_scopes")),
        sa.UniqueConstraint("token_id", "namespace", name=op.f("uq_token_scopes_token_id_namespace")),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("blob_digest", sa.String(length=71), nullable=True),
        sa.Column("codec", sa.String(length=32), nullable=True),
        sa.Column("dtype", sa.String(length=16), nullable=True),
        sa.Column("bits", sa.Integer(), nullable=True),
        sa.Column("size_ratio", sa.Float(), nullable=True),
        sa.Column("fidelity", sa.JSON(), nullable=True),
        sa.Column("header_metadata", sa.JSON(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state = 'pending' OR (number IS NOT NULL AND blob_digest IS NOT NULL)",
            name=op.f("ck_versions_ready_has_number_and_blob"),
        ),
        sa.CheckConstraint("state IN ('pending', 'ready')", name=op.f("ck_versions_state")),
        sa.ForeignKeyConstraint(
            ["blob_digest"], ["blobs.digest"], name=op.f("fk_versions_blob_digest_blobs"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["repositories.id"],
            name=op.f("fk_versions_repository_id_repositories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_versions")),
        sa.UniqueConstraint("repository_id", "number", name=op.f("uq_versions_repository_id_number")),
    )
    op.create_index(op.f("ix_versions_blob_digest"), "versions", ["blob_digest"])
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["repositories.id"],
            name=op.f("fk_tags_repository_id_repositories"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_tags_version_id_versions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("repository_id", "name", name=op.f("uq_tags_repository_id_name")),
    )
    op.create_index(op.f("ix_tags_version_id"), "tags", ["version_id"])
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("raw_digest", sa.String(length=71), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("multipart_id", sa.String(length=1024), nullable=True),
        sa.Column("part_size", sa.BigInteger(), nullable=True),
        sa.Column("received_size", sa.BigInteger(), nullable=True),
        sa.Column("received_digest", sa.String(length=71), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "method IN ('exists', 'stream', 's3-put', 's3-multipart')", name=op.f("ck_uploads_method")
        ),
        sa.CheckConstraint("size >= 0 AND raw_size >= 0", name=op.f("ck_uploads_sizes_non_negative")),
        sa.ForeignKeyConstraint(
            ["version_id"], ["versions.id"], name=op.f("fk_uploads_version_id_versions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("version_id", name=op.f("uq_uploads_version_id")),
    )
    op.create_index(op.f("ix_uploads_created_at"), "uploads", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_uploads_created_at"), table_name="uploads")
    op.drop_table("uploads")
    op.drop_index(op.f("ix_tags_version_id"), table_name="tags")
    op.drop_table("tags")
    op.drop_index(op.f("ix_versions_blob_digest"), table_name="versions")
    op.drop_table("versions")
    op.drop_table("token_scopes")
    op.drop_index(op.f("ix_repositories_name"), table_name="repositories")
    op.drop_index(op.f("ix_repositories_base_model_id"), table_name="repositories")
    op.drop_table("repositories")
    op.drop_table("blobs")
    op.drop_index(op.f("ix_base_models_fingerprint"), table_name="base_models")
    op.drop_table("base_models")
    op.drop_index(op.f("ix_audit_events_target"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_at"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
