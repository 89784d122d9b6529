"""PostgresTurnRepository (app/storage/postgres.py, on an asyncpg pool) against a real Postgres.

Rows it writes read back identically through SqlTurnRepository (SQLAlchemy Core on the same
database) and the other way round; stale and concurrent turns are SessionBusyError; a
connection that dies under a call fails that call as DatabaseUnavailableError (503) and is
not handed out again; a connection that died while idle costs no call at all (asyncpg reads
the server's FATAL and EOF and drops it from the pool by itself).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Any

import asyncpg
import pytest
import sqlalchemy.exc
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.domain import MessageRecord, SessionRecord, StoredMessage, Turn
from app.errors import DatabaseUnavailableError, SessionBusyError
from app.storage.db import head_revision
from app.storage.postgres import (
    INSERT_TURN,
    LOAD_WITH_HISTORY,
    PostgresTurnRepository,
    asyncpg_dsn,
    in_seq_order,
    no_reset,
)
from app.storage.sql import SqlTurnRepository
from app.storage.turns import is_unavailable
from tests.conftest import POSTGRES_ADMIN_URL, make_settings, running_app, wait_until
from tests.support.pgwire import SeveringProxy, refusing_postgres

pytestmark = pytest.mark.integration

CALL = {
    "id": "call_ü_1",
    "type": "function",
    "function": {
        "name": "lookup",
        "arguments": '{"city": "Zürich", "note": "nul \\u0000 and \x00 raw", "n": [1, 2.5]}',
    },
}
METADATA = {"source": "tëst ☃", "nested": {"list": [1, None, True, "🙂"], "float": 0.1}}


@asynccontextmanager
async def postgres_store(
    database_url: str, *, pool_size: int = 1, history_limit: int = 50, pool_timeout: float = 5.0
) -> AsyncIterator[PostgresTurnRepository]:
    """The repository as the service opens it (`PostgresTurnRepository.open`), closed after."""
    settings = make_settings(
        database_url=database_url,
        db_pool_size=pool_size,
        db_max_overflow=0,
        db_pool_timeout=pool_timeout,
        history_max_messages=history_limit,
    )
    store = await PostgresTurnRepository.open(settings)
    try:
        yield store
    finally:
        await asyncio.wait_for(store.aclose(), 10)


@pytest.fixture
async def fast(postgres_url: str) -> AsyncIterator[PostgresTurnRepository]:
    async with postgres_store(postgres_url, pool_size=2) as store:
        yield store


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url, pool_size=2, max_overflow=0)
    yield engine
    await engine.dispose()


@pytest.fixture
def core(engine: AsyncEngine) -> SqlTurnRepository:
    """SQLAlchemy Core's repository on the same database (its engine is the fixture's)."""
    return SqlTurnRepository(engine, history_limit=50)


def rich_turn(session_id: uuid.UUID, owner: str = "alice@example.com") -> Turn:
    return Turn(
        session_id=session_id,
        agent="tools",
        owner=owner,
        is_new=True,
        expected_count=0,
        previous_digest="",
        messages=[
            StoredMessage({"role": "user", "content": "Wetter in Zürich? 天気 \x00 end"}),
            StoredMessage({"role": "assistant", "content": None, "tool_calls": [CALL]}, 11, 7),
            StoredMessage(
                {
                    "role": "tool",
                    "tool_call_id": "call_ü_1",
                    "name": "lookup\x00x",
                    "content": '{"temp": 21}',
                }
            ),
            StoredMessage({"role": "assistant", "content": "21 °C ☀️"}, 30, 5),
        ],
        request_id="req-ü",
        metadata=METADATA,
    )


def follow_up(record: SessionRecord, *texts: str) -> Turn:
    return Turn(
        session_id=record.id,
        agent=record.agent,
        owner=record.owner,
        is_new=False,
        expected_count=record.message_count,
        previous_digest=record.history_digest,
        messages=[
            StoredMessage({"role": "user" if i % 2 == 0 else "assistant", "content": t}, i, i)
            for i, t in enumerate(texts)
        ],
        request_id="req-2",
    )


def new_turn(session_id: uuid.UUID, *texts: str) -> Turn:
    return Turn(
        session_id=session_id,
        agent="assistant",
        owner=None,
        is_new=True,
        expected_count=0,
        previous_digest="",
        messages=[
            StoredMessage({"role": "user" if i % 2 == 0 else "assistant", "content": t})
            for i, t in enumerate(texts)
        ],
        request_id="req",
    )


async def stored_json(pool: asyncpg.Pool, session_id: uuid.UUID) -> tuple[str, list[Any]]:
    """The JSON columns as Postgres holds them: text, and SQL NULL vs JSON null."""
    async with pool.acquire() as conn:
        metadata = await conn.fetchval(
            "SELECT metadata::text FROM sessions WHERE id = $1", session_id
        )
        rows = await conn.fetch(
            "SELECT seq, tool_calls IS NULL, json_typeof(tool_calls) FROM messages"
            " WHERE session_id = $1 ORDER BY seq",
            session_id,
        )
    return str(metadata), [tuple(row) for row in rows]


def without_times(rows: list[MessageRecord]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(row).items() if k != "created_at"} for row in rows]


async def test_each_path_reads_what_the_other_wrote(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    owner = f"alice+{uuid.uuid4().hex[:8]}@example.com"  # the database is shared by the run
    by_fast, by_core = uuid.uuid4(), uuid.uuid4()
    await fast.save_turn(rich_turn(by_fast, owner))
    await core.save_turn(rich_turn(by_core, owner))
    for writer, sid in ((fast, by_fast), (core, by_core)):
        record = await writer.load(sid)
        assert record is not None
        await writer.save_turn(follow_up(record, "und morgen? \x00", "завтра 22 °C"))

    records = {
        (reader_name, sid): await reader.load(sid)
        for reader_name, reader in (("fast", fast), ("core", core))
        for sid in (by_fast, by_core)
    }
    expected_history = [
        {"role": "user", "content": "Wetter in Zürich? 天気 \ufffd end"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        # the name is only kept on tool messages, NUL replaced like everywhere else
        {
            "role": "tool",
            "tool_call_id": "call_ü_1",
            "name": "lookup\ufffdx",
            "content": '{"temp": 21}',
        },
        {"role": "assistant", "content": "21 °C ☀️"},
        {"role": "user", "content": "und morgen? \ufffd"},
        {"role": "assistant", "content": "завтра 22 °C"},
    ]
    reference = records[("core", by_core)]
    assert reference is not None
    assert reference.history == expected_history
    assert reference.metadata == METADATA
    assert reference.message_count == 6
    for (reader_name, sid), record in records.items():
        assert record is not None, (reader_name, sid)
        assert record.id == sid
        assert record.history == expected_history
        assert record.metadata == METADATA
        assert (record.owner, record.agent, record.message_count) == (
            owner,
            "tools",
            6,
        )
        # the digest chains the same messages: the same whoever wrote them
        assert record.history_digest == reference.history_digest
        assert record.created_at.tzinfo is not None
        assert record.updated_at.tzinfo is not None
        assert record.updated_at > record.created_at
    # and each reader returns exactly the same record for the same session
    assert records[("fast", by_fast)] == records[("core", by_fast)]
    assert records[("fast", by_core)] == records[("core", by_core)]

    # the stored messages, bookkeeping and timestamps included, read the same both ways
    for sid in (by_fast, by_core):
        by_either = await fast.messages(sid, limit=100, offset=0)
        assert by_either == await core.messages(sid, limit=100, offset=0)
        assert all(row.created_at.tzinfo is not None for row in by_either)
    fast_rows = await fast.messages(by_fast, limit=100, offset=0)
    core_rows = await fast.messages(by_core, limit=100, offset=0)
    assert without_times(fast_rows) == without_times(core_rows)
    assert [r.prompt_tokens for r in fast_rows] == [0, 11, 0, 30, 0, 1]
    assert [r.completion_tokens for r in fast_rows] == [0, 7, 0, 5, 0, 1]
    assert [r.request_id for r in fast_rows] == ["req-ü"] * 4 + ["req-2"] * 2
    assert [r.seq for r in fast_rows] == [1, 2, 3, 4, 5, 6]
    assert [r.tool_calls for r in fast_rows] == [None, [CALL], None, None, None, None]
    assert fast_rows[2].tool_call_id == "call_ü_1"
    # one turn, one timestamp, as Core writes it
    assert len({r.created_at for r in fast_rows[:4]}) == 1
    assert len({r.created_at for r in core_rows[:4]}) == 1
    assert fast_rows[4].created_at > fast_rows[3].created_at
    assert await fast.messages(by_fast, limit=2, offset=4) == fast_rows[4:]

    listed_fast = await fast.list_sessions(owner, limit=10, offset=0)
    listed_core = await core.list_sessions(owner, limit=10, offset=0)
    assert listed_fast == listed_core
    assert {row.id for row in listed_fast} == {by_fast, by_core}
    assert all(row.metadata == METADATA and row.history == [] for row in listed_fast)
    assert await fast.list_sessions(owner, limit=1, offset=1) == listed_core[1:]

    # Postgres holds the same JSON values (None as JSON null, as SQLAlchemy's JSON type
    # stores it); only the spelling differs: orjson is compact, json.dumps is not
    fast_metadata, fast_kinds = await stored_json(fast.pool, by_fast)
    core_metadata, core_kinds = await stored_json(fast.pool, by_core)
    assert fast_kinds == core_kinds
    assert fast_kinds[0] == (1, False, "null")
    assert fast_kinds[1] == (2, False, "array")
    assert '":' in fast_metadata  # written by the asyncpg path
    assert '": ' not in fast_metadata
    assert '": ' in core_metadata  # written by Core


async def test_load_without_history_and_unknown_sessions(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    sid = uuid.uuid4()
    await fast.save_turn(rich_turn(sid))
    for store in (fast, core):
        bare = await store.load(sid, with_history=False)
        assert bare is not None
        assert bare.history == []
        assert bare.message_count == 4
        assert bare.metadata == METADATA
        assert await store.load(uuid.uuid4()) is None
        assert await store.load(uuid.uuid4(), with_history=False) is None
    assert await fast.load(sid, with_history=False) == await core.load(sid, with_history=False)


async def test_delete_and_schema_revision_agree_across_paths(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    one, two = uuid.uuid4(), uuid.uuid4()
    await core.save_turn(new_turn(one, "q", "a"))
    await fast.save_turn(new_turn(two, "q", "a"))
    assert await fast.delete(one) is True  # written by Core, its messages go with it
    assert await fast.delete(one) is False
    assert await core.load(one) is None
    assert await core.messages(one, limit=10, offset=0) == []
    assert await core.delete(two) is True
    assert await fast.load(two) is None
    assert await fast.messages(two, limit=10, offset=0) == []
    assert await fast.schema_revision() == await core.schema_revision() == head_revision()


async def test_both_paths_read_a_session_without_messages_and_null_columns_alike(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    """Rows the API never writes, inserted by hand: a session with no message (the window's
    arrays are NULL) and messages whose nullable columns are SQL NULL."""
    sid = uuid.uuid4()
    async with fast.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO sessions (id, owner, agent, message_count, history_digest,"
            " metadata, created_at, updated_at)"
            " VALUES ($1, NULL, 'assistant', 0, '', '{}', now(), now())",
            sid,
        )
    empty = await fast.load(sid)
    assert empty is not None
    assert empty.history == []
    assert empty == await core.load(sid)

    async with fast.pool.acquire() as conn, conn.transaction():
        for seq, role, content in ((1, "user", "q"), (2, "assistant", None), (3, "tool", "x")):
            await conn.execute(
                "INSERT INTO messages (session_id, seq, role, content, prompt_tokens,"
                " completion_tokens, created_at) VALUES ($1, $2, $3, $4, 0, 0, now())",
                sid,
                seq,
                role,
                content,
            )
        await conn.execute("UPDATE sessions SET message_count = 3 WHERE id = $1", sid)
    record = await fast.load(sid)
    assert record is not None
    assert record.history == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "x"},
    ]
    assert record == await core.load(sid)
    rows = await fast.messages(sid, limit=10, offset=0)
    assert [(r.tool_calls, r.tool_call_id, r.name, r.request_id) for r in rows] == [
        (None, None, None, None)
    ] * 3
    assert rows == await core.messages(sid, limit=10, offset=0)


async def test_the_window_is_the_last_messages_starting_at_a_user_message(
    postgres_url: str, engine: AsyncEngine
) -> None:
    core = SqlTurnRepository(engine, history_limit=3)
    async with postgres_store(postgres_url, history_limit=3) as fast:
        sid = uuid.uuid4()
        await fast.save_turn(new_turn(sid, "q0", "a0", "q1", "a1"))
        record = await fast.load(sid)
        assert record is not None
        assert [m["content"] for m in record.history] == ["q1", "a1"]  # a0 cut: not a user one
        assert record == await core.load(sid)


async def test_the_window_comes_back_in_seq_order_whatever_order_the_server_reads(
    postgres_url: str, engine: AsyncEngine
) -> None:
    """The asyncpg path aggregates the window unordered and orders it itself: with the rows
    stored backwards and only sequential scans allowed, the server reads them backwards."""
    pool = await asyncpg.create_pool(
        asyncpg_dsn(postgres_url),
        min_size=0,
        max_size=1,
        reset=no_reset,
        server_settings={"enable_indexscan": "off", "enable_bitmapscan": "off"},
    )
    try:
        fast = PostgresTurnRepository(pool, history_limit=6, acquire_timeout=5)
        core = SqlTurnRepository(engine, history_limit=6)
        sid = uuid.uuid4()
        texts = [f"{'q' if i % 2 == 0 else 'a'}{i // 2}" for i in range(10)]
        await fast.save_turn(new_turn(sid, *texts))
        async with pool.acquire() as conn:
            await conn.execute(
                "WITH gone AS (DELETE FROM messages WHERE session_id = $1 RETURNING *) "
                "INSERT INTO messages SELECT * FROM gone ORDER BY seq DESC",
                sid,
            )
            read = await conn.fetchval(
                "SELECT array_agg(seq) FROM messages WHERE session_id = $1", sid
            )
            assert read == list(range(10, 0, -1))  # what the server hands over
        record = await fast.load(sid)
        assert record is not None
        assert [m["content"] for m in record.history] == texts[4:]
        assert record == await core.load(sid)
    finally:
        await pool.close()


def test_in_seq_order_reorders_every_column_alike() -> None:
    seqs = [7, 5, 8, 6]
    columns: list[list[Any]] = [["g", "e", "h", "f"], [70, 50, 80, 60]]
    assert in_seq_order(seqs, columns) == [["e", "f", "g", "h"], [50, 60, 70, 80]]
    in_order: list[list[Any]] = [["e", "f"], [50, 60]]
    assert in_seq_order([5, 6], in_order) is in_order  # nothing copied when in order


async def test_a_stale_turn_is_busy_and_writes_nothing(fast: PostgresTurnRepository) -> None:
    sid = uuid.uuid4()
    await fast.save_turn(new_turn(sid, "q0", "a0"))
    first = await fast.load(sid)
    assert first is not None
    await fast.save_turn(follow_up(first, "q1", "a1"))
    with pytest.raises(SessionBusyError):
        await fast.save_turn(follow_up(first, "late", "late answer"))
    with pytest.raises(SessionBusyError):  # a continuation of a session that does not exist
        await fast.save_turn(replace(follow_up(first, "x", "y"), session_id=uuid.uuid4()))
    after = await fast.load(sid)
    assert after is not None
    assert after.message_count == 4
    assert [m["content"] for m in after.history] == ["q0", "a0", "q1", "a1"]
    assert len(await fast.messages(sid, limit=1000, offset=0)) == 4


async def test_concurrent_writers_of_one_turn_leave_exactly_one(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    sid = uuid.uuid4()
    await fast.save_turn(new_turn(sid, "q0", "a0"))
    record = await fast.load(sid)
    assert record is not None
    # both paths at once: they serialise on the session row
    writers: list[PostgresTurnRepository | SqlTurnRepository] = [fast, core, fast, core]
    results = await asyncio.gather(
        *(w.save_turn(follow_up(record, f"q-{i}", f"a-{i}")) for i, w in enumerate(writers)),
        return_exceptions=True,
    )
    winners = [i for i, result in enumerate(results) if result is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, SessionBusyError) for r in results if r is not None), results
    after = await core.load(sid)
    assert after is not None
    assert after.message_count == 4
    assert [m["content"] for m in after.history][2:] == [f"q-{winners[0]}", f"a-{winners[0]}"]
    assert len(await core.messages(sid, limit=1000, offset=0)) == 4


async def test_concurrent_new_sessions_with_one_id_leave_exactly_one(
    fast: PostgresTurnRepository, core: SqlTurnRepository
) -> None:
    sid = uuid.uuid4()
    writers: list[PostgresTurnRepository | SqlTurnRepository] = [fast, core, fast, core]
    results = await asyncio.gather(
        *(w.save_turn(new_turn(sid, f"q-{i}", f"a-{i}")) for i, w in enumerate(writers)),
        return_exceptions=True,
    )
    winners = [i for i, result in enumerate(results) if result is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, SessionBusyError) for r in results if r is not None), results
    rows = await fast.messages(sid, limit=1000, offset=0)
    assert [r.content for r in rows] == [f"q-{winners[0]}", f"a-{winners[0]}"]


def checked_out(pool: asyncpg.Pool) -> int:
    """Connections handed out and not yet returned."""
    return int(pool.get_size() - pool.get_idle_size())


async def backend_pids(pool: asyncpg.Pool, count: int) -> list[int]:
    """The server pids of `count` pooled connections (held together, so all distinct)."""
    connections = [await pool.acquire(timeout=5) for _ in range(count)]
    try:
        return [int(await conn.fetchval("SELECT pg_backend_pid()")) for conn in connections]
    finally:
        for conn in connections:
            await pool.release(conn)


async def test_the_seq_numbers_taken_by_a_concurrent_writer_are_busy(postgres_url: str) -> None:
    """The unique (session_id, seq) index, not the version check, refuses this one; the
    failed statement leaves its connection idle and in the pool."""
    async with postgres_store(postgres_url) as fast:
        sid = uuid.uuid4()
        await fast.save_turn(new_turn(sid, "q0", "a0"))
        async with fast.pool.acquire() as conn:  # a writer that did not bump message_count
            await conn.execute(
                "INSERT INTO messages (session_id, seq, role, content, prompt_tokens,"
                " completion_tokens, created_at) VALUES ($1, 3, 'user', 'x', 0, 0, now())",
                sid,
            )
        record = await fast.load(sid)
        assert record is not None
        [pid] = await backend_pids(fast.pool, 1)
        with pytest.raises(SessionBusyError) as caught:
            await fast.save_turn(follow_up(record, "q1", "a1"))
        assert isinstance(caught.value.__cause__, asyncpg.UniqueViolationError)
        after = await fast.load(sid, with_history=False)
        assert after is not None
        assert after.message_count == 2  # the session row's update was undone with the rest
        await fast.save_turn(new_turn(uuid.uuid4(), "q", "a"))
        assert await backend_pids(fast.pool, 1) == [pid]  # the same connection served on


async def admin() -> asyncpg.Connection:
    return await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)


async def terminate(pids: list[int]) -> None:
    """pg_terminate_backend, then wait until the backends are gone."""
    conn = await admin()
    try:
        for pid in pids:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):
            alive = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])", pids
            )
            if alive == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"backends {pids} still alive")
    finally:
        await conn.close()


async def waiting_on_a_lock(pids: list[int]) -> int:
    """The first of `pids` found waiting on a lock (a statement blocked under way)."""
    conn = await admin()
    try:
        for _ in range(500):
            waiting = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity"
                " WHERE pid = any($1::int[]) AND wait_event_type = 'Lock'",
                pids,
            )
            if waiting is not None:
                return int(waiting)
            await asyncio.sleep(0.01)
        raise AssertionError(f"none of {pids} got to wait on a lock")
    finally:
        await conn.close()


async def until_no_statement_runs(pid: int) -> None:
    """Wait until backend `pid` runs no statement (finished, failed, or gone)."""
    conn = await admin()
    try:
        for _ in range(500):
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid
            ):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"backend {pid} still runs a statement")
    finally:
        await conn.close()


@asynccontextmanager
async def locked(database_url: str, statement: str, *args: Any) -> AsyncIterator[None]:
    """`statement` run in a transaction of its own, held (with its locks) for the block."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=5)
    try:
        async with conn.transaction():
            await conn.execute(statement, *args)
            yield
    finally:
        await conn.close()


def sessions_table_locked(database_url: str) -> Any:
    """Every statement on `sessions` (loads too) waits until the block ends."""
    return locked(database_url, "LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")


async def saved_session(
    store: PostgresTurnRepository,
) -> tuple[uuid.UUID, SessionRecord]:
    sid = uuid.uuid4()
    await store.save_turn(new_turn(sid, "q0", "a0"))
    record = await store.load(sid)
    assert record is not None
    return sid, record


def one_call(
    store: PostgresTurnRepository, operation: str, sid: uuid.UUID, record: SessionRecord
) -> Callable[[], Coroutine[Any, Any, Any]]:
    if operation == "load":
        return lambda: store.load(sid)
    return lambda: store.save_turn(follow_up(record, "q1", "a1"))


@pytest.mark.parametrize("operation", ["load", "save_turn"])
async def test_a_connection_killed_under_a_call_fails_that_call_then_a_fresh_one_serves(
    postgres_url: str, operation: str
) -> None:
    async with postgres_store(postgres_url) as store:
        sid, record = await saved_session(store)
        call = one_call(store, operation, sid, record)
        [old_pid] = await backend_pids(store.pool, 1)
        async with sessions_table_locked(postgres_url):
            blocked = asyncio.create_task(call())
            await waiting_on_a_lock([old_pid])
            await terminate([old_pid])
            with pytest.raises(DatabaseUnavailableError):
                await blocked
        assert checked_out(store.pool) == 0  # returned, not leaked
        assert store.pool.get_size() == 0  # and dropped: nobody gets it again
        await call()  # on a fresh connection; a killed save_turn wrote nothing, so it fits
        [new_pid] = await backend_pids(store.pool, 1)
        assert new_pid != old_pid
        after = await store.load(sid)
        assert after is not None
        assert after.message_count == (2 if operation == "load" else 4)


@pytest.mark.parametrize("operation", ["load", "save_turn"])
async def test_a_connection_killed_while_idle_costs_no_call(
    postgres_url: str, operation: str
) -> None:
    """The server says FATAL and closes; asyncpg reads that on the idle connection and drops
    it from the pool, so the next call connects afresh instead of failing."""
    async with postgres_store(postgres_url) as store:
        sid, record = await saved_session(store)
        [old_pid] = await backend_pids(store.pool, 1)
        await terminate([old_pid])
        await wait_until(lambda: store.pool.get_size() == 0)
        await one_call(store, operation, sid, record)()
        [new_pid] = await backend_pids(store.pool, 1)
        assert new_pid != old_pid


async def test_after_a_restart_only_the_call_under_way_fails(postgres_url: str) -> None:
    """Every pooled connection killed at once (what a restart does): the call running on one
    of them fails; the idle ones cost nothing, and every connection is new afterwards."""
    async with postgres_store(postgres_url, pool_size=3) as store:
        sid, _ = await saved_session(store)
        old = await backend_pids(store.pool, 3)
        async with sessions_table_locked(postgres_url):
            blocked = asyncio.create_task(store.load(sid))
            await waiting_on_a_lock(old)
            await terminate(old)
            with pytest.raises(DatabaseUnavailableError):
                await blocked
        # all three connections at once, so none is served by a connection from before
        records = await asyncio.gather(*(store.load(sid) for _ in range(3)))
        assert all(record is not None for record in records)
        assert not set(await backend_pids(store.pool, 3)) & set(old)


@asynccontextmanager
async def severing_proxy(database_url: str) -> AsyncIterator[tuple[SeveringProxy, str]]:
    """A proxy to the test server, and `database_url` rewritten to go through it."""
    url = make_url(database_url)
    proxy = SeveringProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        yield proxy, url.set(port=port).render_as_string(hide_password=False)
    finally:
        await proxy.aclose()


@pytest.mark.parametrize("operation", ["load", "save_turn"])
async def test_a_connection_cut_by_the_network_fails_one_call_then_a_fresh_one_serves(
    postgres_url: str, operation: str
) -> None:
    """Unlike a killed backend, a cut connection looks alive until it is used."""
    async with (
        severing_proxy(postgres_url) as (proxy, through_proxy),
        postgres_store(through_proxy) as store,
    ):
        sid, record = await saved_session(store)
        call = one_call(store, operation, sid, record)
        assert proxy.sever() == 1
        assert store.pool.get_idle_size() == 1  # the client cannot tell
        with pytest.raises(DatabaseUnavailableError):
            await call()
        assert checked_out(store.pool) == 0
        await call()  # on a fresh connection; the cut save_turn wrote nothing, so it fits
        after = await store.load(sid)
        assert after is not None
        assert after.message_count == (2 if operation == "load" else 4)


async def test_after_every_pooled_connection_was_cut_only_one_call_fails(
    postgres_url: str,
) -> None:
    """The case `pool.expire_connections()` is for: the first failure means the others, which
    still look alive, died too; the next call must not be handed one of them (else every
    pooled connection fails a call of its own: N 503s for one outage)."""
    async with (
        severing_proxy(postgres_url) as (proxy, through_proxy),
        postgres_store(through_proxy, pool_size=3) as store,
    ):
        sid, _ = await saved_session(store)
        await backend_pids(store.pool, 3)  # three open connections
        assert proxy.sever() == 3
        assert store.pool.get_idle_size() == 3
        outcomes: list[str] = []
        for _ in range(4):
            try:
                await store.load(sid)
            except DatabaseUnavailableError:
                outcomes.append("unavailable")
            else:
                outcomes.append("ok")
        assert outcomes == ["unavailable", "ok", "ok", "ok"]


async def cancelled_while_blocked_on_the_session_row(
    database_url: str, store: PostgresTurnRepository
) -> tuple[uuid.UUID, SessionRecord, int]:
    """A saved session, and a continuation of it cancelled while it waited for the session
    row (locked by another transaction until the return): the session's id and record, and
    the pid of the backend that ran the cancelled statement."""
    sid, record = await saved_session(store)
    [pid] = await backend_pids(store.pool, 1)
    async with locked(database_url, "SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", sid):
        blocked = asyncio.create_task(store.save_turn(follow_up(record, "q1", "a1")))
        await waiting_on_a_lock([pid])
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert checked_out(store.pool) == 0
        # the pool serves meanwhile (a plain read does not wait for the row lock)
        during = await store.load(sid, with_history=False)
        assert during is not None
        assert during.message_count == 2
    return sid, record, pid


async def test_a_cancelled_turn_leaves_a_usable_pool(postgres_url: str) -> None:
    """Cancelled mid-statement, the connection goes back to the pool once its statement is
    cancelled on the server, and serves the next call."""
    async with postgres_store(postgres_url) as store:
        sid, _, _ = await cancelled_while_blocked_on_the_session_row(postgres_url, store)
        assert checked_out(store.pool) == 0
        assert await store.load(sid) is not None


async def test_a_cancelled_turn_commits_nothing(postgres_url: str) -> None:
    """A turn is one autocommit statement: closing the client's socket does not stop a
    backend that waits on a lock (it notices only when it next talks to the client), so
    unless the statement is cancelled on the server it runs on and commits once the lock is
    released."""
    async with postgres_store(postgres_url) as store:
        sid, record, old_pid = await cancelled_while_blocked_on_the_session_row(postgres_url, store)
        await until_no_statement_runs(old_pid)  # the lock is gone: it ran on, or was stopped
        after = await store.load(sid)
        assert after is not None
        assert after.message_count == 2
        # and the same turn still fits
        await store.save_turn(follow_up(record, "q1 again", "a1 again"))
        again = await store.load(sid)
        assert again is not None
        assert [m["content"] for m in again.history] == ["q0", "a0", "q1 again", "a1 again"]


async def test_no_pooled_connection_in_time_is_unavailable(postgres_url: str) -> None:
    async with postgres_store(postgres_url, pool_timeout=0.2) as store:
        sid, _ = await saved_session(store)
        async with store.pool.acquire() as held:
            await held.fetchval("SELECT 1")
            with pytest.raises(DatabaseUnavailableError) as caught:
                await store.load(sid)
            assert isinstance(caught.value.__cause__, TimeoutError)
            with pytest.raises(DatabaseUnavailableError):
                await store.save_turn(new_turn(uuid.uuid4(), "q", "a"))
            assert checked_out(store.pool) == 1  # only the one held here
        assert await store.load(sid) is not None


async def test_a_refused_connection_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nothing"
    async with postgres_store(url) as store:  # opens without connecting
        with pytest.raises(DatabaseUnavailableError) as caught:
            await store.load(uuid.uuid4())
        assert isinstance(caught.value.__cause__, OSError)
        with pytest.raises(DatabaseUnavailableError):
            await store.save_turn(new_turn(uuid.uuid4(), "q", "a"))
        assert store.pool.get_size() == 0


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps: causes, and SQLAlchemy's `orig`."""
    found: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or error in found:
            continue
        found.append(error)
        pending += [error.__cause__, getattr(error, "orig", None)]
    return found


@pytest.mark.parametrize(
    ("sqlstate", "message", "ask_password", "refusal", "unavailable"),
    [
        ("53300", "sorry, too many clients already", False, asyncpg.TooManyConnectionsError, True),
        (
            "57P03",
            "the database system is starting up",
            False,
            asyncpg.CannotConnectNowError,
            True,
        ),
        (
            "28P01",
            'password authentication failed for user "postgres"',
            True,
            asyncpg.InvalidPasswordError,
            False,
        ),
    ],
)
async def test_what_the_server_says_when_connecting_is_classified(
    sqlstate: str,
    message: str,
    ask_password: bool,
    refusal: type[Exception],
    unavailable: bool,
) -> None:
    """53300 and 57P03 at connect are the server, not the data (503); a bad password is a
    misconfiguration and is not hidden as one. Both paths agree. The server here is a stub
    that sends the ErrorResponse Postgres sends (the test server trusts every login, so it
    cannot refuse a password); asyncpg parses it as it would a real one."""
    async with refusing_postgres(sqlstate, message, ask_password=ask_password) as server:
        url = f"postgresql+asyncpg://postgres:wrong@127.0.0.1:{server.port}/agentserve"
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        try:
            async with postgres_store(url) as fast:
                core = SqlTurnRepository(engine, history_limit=50)
                for store in (fast, core):
                    calls: list[Awaitable[Any]] = [
                        store.load(uuid.uuid4()),
                        store.save_turn(new_turn(uuid.uuid4(), "q", "a")),
                    ]
                    for call in calls:
                        with pytest.raises(Exception) as caught:  # noqa: PT011 - checked below
                            await call
                        assert isinstance(caught.value, DatabaseUnavailableError) is unavailable
                        assert any(isinstance(e, refusal) for e in causes(caught.value))
                assert fast.pool.get_size() == 0
        finally:
            await engine.dispose()
        assert server.attempts == 4  # each call reached the server, and was refused


async def test_opentelemetrys_asyncpg_instrumentation_sees_the_turn_statements(
    fast: PostgresTurnRepository,
) -> None:
    """Both hot statements run through asyncpg's Connection methods, which OpenTelemetry's
    asyncpg instrumentation (what the service's tracing turns on for Postgres) wraps."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    assert not instrumentor.is_instrumented_by_opentelemetry  # nothing left it on
    instrumentor.instrument(tracer_provider=provider)
    try:
        sid = uuid.uuid4()
        await fast.save_turn(new_turn(sid, "q", "a"))
        assert await fast.load(sid) is not None
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    # db.statement, or db.query.text under OTEL_SEMCONV_STABILITY_OPT_IN=database
    statements = [
        (span.attributes or {}).get("db.statement", (span.attributes or {}).get("db.query.text"))
        for span in spans
    ]
    assert statements == [INSERT_TURN, LOAD_WITH_HISTORY], statements
    assert "INSERT INTO sessions" in str(statements[0])
    assert str(statements[1]).startswith("SELECT")
    assert all(span.kind is SpanKind.CLIENT for span in spans)
    # and nothing is traced once uninstrumented
    await fast.load(sid)
    assert len(exporter.get_finished_spans()) == 2


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (asyncpg.TooManyConnectionsError("too many"), True),  # 53300
        (asyncpg.CannotConnectNowError("starting up"), True),  # 57P03
        (asyncpg.AdminShutdownError("terminated"), True),  # 57P01
        (asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"), True),  # 08003
        (asyncpg.ConnectionFailureError("failure"), True),  # 08006
        (ConnectionResetError("reset"), True),
        (ConnectionRefusedError("refused"), True),
        (TimeoutError(), True),  # no pooled connection in time, a connect timeout
        (sqlalchemy.exc.InterfaceError("SELECT 1", None, Exception("connection is closed")), True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit"), True),
        (asyncpg.InvalidPasswordError("password authentication failed"), False),  # 28P01
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.UniqueViolationError("dup"), False),  # 23505
        (asyncpg.StringDataRightTruncationError("long"), False),  # 22001
        (asyncpg.UndefinedTableError("no alembic_version"), False),  # 42P01
        (ValueError("not the database"), False),
    ],
)
def test_what_counts_as_the_server_being_unavailable(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


async def test_api_answers_503_for_a_connection_killed_under_a_request_then_recovers(
    postgres_url: str,
) -> None:
    settings = make_settings(database_url=postgres_url, db_pool_size=1, db_max_overflow=0)
    async with running_app(settings) as (app, client):
        first = await client.post("/query", json={"message": "hello"})
        assert first.status_code == 200, first.text
        sid = first.json()["session_id"]
        turns = app.state.runtime.turns
        assert isinstance(turns, PostgresTurnRepository)

        # killed while idle: asyncpg drops it, the request connects afresh
        await terminate(await backend_pids(turns.pool, 1))
        await wait_until(lambda: turns.pool.get_size() == 0)
        idle = await client.post("/query", json={"message": "there?", "session_id": sid})
        assert idle.status_code == 200, idle.text

        # killed under the request's statement: that request is 503
        [pid] = await backend_pids(turns.pool, 1)
        async with sessions_table_locked(postgres_url):
            request = asyncio.create_task(
                client.post("/query", json={"message": "still there?", "session_id": sid})
            )
            await waiting_on_a_lock([pid])
            await terminate([pid])
            failed = await request
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "database_unavailable"
        assert int(failed.headers["retry-after"]) >= 1
        again = await client.post("/query", json={"message": "still there?", "session_id": sid})
        assert again.status_code == 200, again.text
        assert again.json()["session_id"] == sid
        assert checked_out(turns.pool) == 0
    async with running_app(settings) as (app, _):
        record = await app.state.runtime.turns.load(uuid.UUID(sid))
    assert record is not None
    assert record.message_count == 6
