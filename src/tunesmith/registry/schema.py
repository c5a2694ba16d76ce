"""The registry's relational schema (SQLAlchemy 2 ORM). Alembic migrations in `migrations/versions` create it.

Tables:
  runs          one row per registered run version; (name, version) is unique, which is what makes concurrent
                registrations of the same name safe (a clash is an IntegrityError, and the writer retries).
  artifacts     content-addressed folders (adapters, logs) by digest "sha256:<hex>"; a row exists only once its
                files are complete in the artifact store, so no run can point at a missing artifact.
  lineage       (child, parent, relation): continued_from / merged_from edges between runs.
  aliases       a named pointer (e.g. production) to a run, with a revision counter that serves as an ETag.
  alias_events  every promote and rollback, in order: the alias history, and the stack rollback pops.
  settings      registry-wide settings (the artifact store URL), so every client of one database agrees.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STATUSES = ("running", "finished", "failed", "promoted", "archived")
RELATIONS = ("continued_from", "merged_from")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored naive UTC: identical on SQLite and PostgreSQL


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    __tablename__ = "artifacts"
    digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    file_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_used_at: Mapped[datetime] = mapped_column(DateTime)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_runs_name_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    run_dir: Mapped[str] = mapped_column(Text)
    identity: Mapped[str] = mapped_column(String(80), index=True)
    method: Mapped[str | None] = mapped_column(String(32))
    base_model: Mapped[str | None] = mapped_column(Text)
    base_model_path: Mapped[str | None] = mapped_column(Text)
    base_model_hash: Mapped[str | None] = mapped_column(String(80))
    data_hash: Mapped[str | None] = mapped_column(String(80))
    data_location: Mapped[str | None] = mapped_column(Text)
    data_manifest_json: Mapped[str | None] = mapped_column(Text)
    config_yaml: Mapped[str] = mapped_column(Text)
    summary_json: Mapped[str | None] = mapped_column(Text)
    eval_json: Mapped[str | None] = mapped_column(Text)
    code_version: Mapped[str | None] = mapped_column(String(200))
    adapter_digest: Mapped[str | None] = mapped_column(ForeignKey("artifacts.digest"), index=True)
    logs_digest: Mapped[str | None] = mapped_column(ForeignKey("artifacts.digest"), index=True)


class Lineage(Base):
    __tablename__ = "lineage"
    child_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True, index=True)
    relation: Mapped[str] = mapped_column(String(16), primary_key=True)


class Alias(Base):
    __tablename__ = "aliases"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class AliasEvent(Base):
    __tablename__ = "alias_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    previous_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    revision: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime)
