"""Stored conversations behind one interface (`TurnRepository`), chosen once at start-up."""

from __future__ import annotations

from app.config import Settings
from app.storage.db import create_engine
from app.storage.postgres import PostgresTurnRepository
from app.storage.sql import SqlTurnRepository
from app.storage.turns import TurnRepository

__all__ = ["PostgresTurnRepository", "SqlTurnRepository", "TurnRepository", "open_repository"]


async def open_repository(settings: Settings) -> PostgresTurnRepository | SqlTurnRepository:
    """Postgres gets its own asyncpg repository; every other database, SQLAlchemy Core's."""
    if settings.is_postgres:
        return await PostgresTurnRepository.open(settings)
    return SqlTurnRepository(create_engine(settings), history_limit=settings.history_max_messages)
