"""The engine, and the Alembic migrations that own the schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.config import Settings


def migrations_dir() -> Path:
    """The Alembic scripts: `app/migrations` in an installed wheel (pyproject.toml ships them
    there), the top-level `migrations/` in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "migrations"
    return installed if installed.is_dir() else package.parent / "migrations"


def ensure_sqlite_directory(database_url: str) -> None:
    """SQLite creates the file but not its folder (`var/` on a fresh clone)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(settings: Settings) -> AsyncEngine:
    url = make_url(settings.database_url)
    if settings.is_sqlite:
        ensure_sqlite_directory(settings.database_url)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        # No pre-ping: for asyncpg it costs BEGIN/;/ROLLBACK on every checkout. A connection
        # that died with the server fails its request (503, Retry-After) and SQLAlchemy then
        # discards the whole pool, so the next request reconnects.
        pool_pre_ping=False,
        pool_recycle=1800,
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """WAL lets readers run beside the writer; foreign keys make ON DELETE CASCADE work."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(database_url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def known_revisions() -> frozenset[str]:
    """Every revision this code ships; a database at another one was migrated by a newer
    release (during a rolling upgrade the old pods keep serving)."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(revision.revision for revision in script.walk_revisions())


def upgrade_to_head(database_url: str) -> None:
    """Run `alembic upgrade head` (blocking: call it in a thread from async code)."""
    from alembic import command

    ensure_sqlite_directory(database_url)
    command.upgrade(alembic_config(database_url), "head")


async def migrate(database_url: str) -> None:
    await asyncio.to_thread(upgrade_to_head, database_url)
