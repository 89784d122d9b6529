"""Stored conversations behind one interface (`TurnRepository`), chosen once at start-up."""

from __future__ import annotations

from app.config import Settings
from app.storage.db import create_engine
from app.storage.postgres import PostgresTurnRepository
from app.storage.sql import SqlTurnRepository
from app.storage.turns import TurnRepository

__all__ = ["SqlTurnRepository", "TurnRepository", "open_repository"]


def open_repository(settings: Settings) -> SqlTurnRepository:
    """Postgres (asyncpg) gets its one-statement turns; every other database, Core's."""
    engine = create_engine(settings)
    limit = settings.history_max_messages
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
        return PostgresTurnRepository(engine, history_limit=limit)
    return SqlTurnRepository(engine, history_limit=limit)
