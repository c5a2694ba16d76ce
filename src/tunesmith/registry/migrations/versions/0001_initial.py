"""Initial registry schema: settings, artifacts, runs, lineage, aliases, alias_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
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
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "artifacts",
        sa.Column("digest", sa.String(80), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("run_dir", sa.Text(), nullable=False),
        sa.Column("identity", sa.String(80), nullable=False),
        sa.Column("method", sa.String(32), nullable=True),
        sa.Column("base_model", sa.Text(), nullable=True),
        sa.Column("base_model_path", sa.Text(), nullable=True),
        sa.Column("base_model_hash", sa.String(80), nullable=True),
        sa.Column("data_hash", sa.String(80), nullable=True),
        sa.Column("data_location", sa.Text(), nullable=True),
        sa.Column("data_manifest_json", sa.Text(), nullable=True),
        sa.Column("config_yaml", sa.Text(), nullable=False),
        sa.Column("summary_json", sa.Text(), nullable=True),
        sa.Column("eval_json", sa.Text(), nullable=True),
        sa.Column("code_version", sa.String(200), nullable=True),
        sa.Column("adapter_digest", sa.String(80), sa.ForeignKey("artifacts.digest"), nullable=True),
        sa.Column("logs_digest", sa.String(80), sa.ForeignKey("artifacts.digest"), nullable=True),
        sa.UniqueConstraint("name", "version", name="uq_runs_name_version"),
    )
    op.create_index("ix_runs_name", "runs", ["name"])
    op.create_index("ix_runs_identity", "runs", ["identity"])
    op.create_index("ix_runs_adapter_digest", "runs", ["adapter_digest"])
    op.create_index("ix_runs_logs_digest", "runs", ["logs_digest"])
    op.create_table(
        "lineage",
        sa.Column("child_id", sa.Integer(), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("relation", sa.String(16), primary_key=True),
    )
    op.create_index("ix_lineage_parent_id", "lineage", ["parent_id"])
    op.create_table(
        "aliases",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("alias", sa.String(100), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("previous_run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_alias_events_alias", "alias_events", ["alias"])


def downgrade() -> None:
    for table in ("alias_events", "aliases", "lineage", "runs", "artifacts", "settings"):
        op.drop_table(table)
