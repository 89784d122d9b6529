"""PostgresTurnRepository (app/storage/postgres.py) against a real Postgres.

Rows it writes read back identically through SqlTurnRepository (Core) and the other way
round; stale and concurrent turns are SessionBusyError; a connection the server dropped fails
one call as DatabaseUnavailableError (503) and is not handed out again.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from app.domain import MessageRecord, SessionRecord, StoredMessage, Turn
from app.errors import DatabaseUnavailableError, SessionBusyError
from app.storage.postgres import PostgresTurnRepository, in_seq_order
from app.storage.sql import SqlTurnRepository
from app.storage.turns import is_unavailable
from tests.conftest import POSTGRES_ADMIN_URL, make_settings, running_app

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


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url, pool_size=2, max_overflow=0)
    yield engine
    await engine.dispose()


def stores(engine: AsyncEngine) -> tuple[PostgresTurnRepository, SqlTurnRepository]:
    """(Postgres' own statements, SQLAlchemy Core) over the same engine and pool."""
    fast = PostgresTurnRepository(engine, history_limit=50)
    core = SqlTurnRepository(engine, history_limit=50)
    return fast, core


def rich_turn(session_id: uuid.UUID) -> Turn:
    return Turn(
        session_id=session_id,
        agent="tools",
        owner="alice@example.com",
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


async def stored_json(engine: AsyncEngine, session_id: uuid.UUID) -> tuple[str, list[Any]]:
    """The JSON columns as Postgres holds them: text, and SQL NULL vs JSON null."""
    async with engine.connect() as conn:
        metadata = (
            await conn.execute(
                text("SELECT metadata::text FROM sessions WHERE id = :id"), {"id": session_id}
            )
        ).scalar_one()
        rows = (
            await conn.execute(
                text(
                    "SELECT seq, tool_calls IS NULL, json_typeof(tool_calls) FROM messages"
                    " WHERE session_id = :id ORDER BY seq"
                ),
                {"id": session_id},
            )
        ).all()
    return str(metadata), [tuple(row) for row in rows]


def without_times(rows: list[MessageRecord]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(row).items() if k != "created_at"} for row in rows]


async def test_each_path_reads_what_the_other_wrote(engine: AsyncEngine) -> None:
    fast, core = stores(engine)
    by_fast, by_core = uuid.uuid4(), uuid.uuid4()
    await fast.save_turn(rich_turn(by_fast))
    await core.save_turn(rich_turn(by_core))
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
            "alice@example.com",
            "tools",
            6,
        )
        # the digest chains the same messages: the same whoever wrote them
        assert record.history_digest == reference.history_digest
        assert record.created_at.tzinfo is not None
        assert record.updated_at > record.created_at
    # and each reader returns exactly the same record for the same session
    assert records[("fast", by_fast)] == records[("core", by_fast)]
    assert records[("fast", by_core)] == records[("core", by_core)]

    # the Core-only reads see the same rows, bookkeeping included
    fast_rows = await core.messages(by_fast, limit=100, offset=0)
    core_rows = await core.messages(by_core, limit=100, offset=0)
    assert without_times(fast_rows) == without_times(core_rows)
    assert [r.prompt_tokens for r in fast_rows] == [0, 11, 0, 30, 0, 1]
    assert [r.request_id for r in fast_rows] == ["req-ü"] * 4 + ["req-2"] * 2
    assert [r.seq for r in fast_rows] == [1, 2, 3, 4, 5, 6]
    # one turn, one timestamp, as Core writes it
    assert len({r.created_at for r in fast_rows[:4]}) == 1
    listed = {
        row.id: row for row in await core.list_sessions("alice@example.com", limit=10, offset=0)
    }
    assert listed[by_fast].metadata == listed[by_core].metadata == METADATA
    assert (
        len(await fast.messages(by_fast, limit=1000, offset=0))
        == len(await core.messages(by_core, limit=1000, offset=0))
        == 6
    )

    # Postgres holds the same JSON values (None as JSON null, as SQLAlchemy's JSON type
    # stores it); only the spelling differs: orjson is compact, json.dumps is not
    fast_metadata, fast_kinds = await stored_json(engine, by_fast)
    core_metadata, core_kinds = await stored_json(engine, by_core)
    assert fast_kinds == core_kinds
    assert fast_kinds[0] == (1, False, "null")
    assert fast_kinds[1] == (2, False, "array")
    assert '":' in fast_metadata  # written by the fast path
    assert '": ' not in fast_metadata
    assert '": ' in core_metadata  # written by Core


async def test_load_without_history_and_unknown_sessions(engine: AsyncEngine) -> None:
    fast, core = stores(engine)
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


async def test_both_paths_read_a_session_without_messages_and_null_columns_alike(
    engine: AsyncEngine,
) -> None:
    """Rows the API never writes, inserted by hand: a session with no message (the window's
    arrays are NULL) and messages whose nullable columns are SQL NULL."""
    fast, core = stores(engine)
    sid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO sessions (id, owner, agent, message_count, history_digest,"
                " metadata, created_at, updated_at)"
                " VALUES (:id, NULL, 'assistant', 0, '', '{}', now(), now())"
            ),
            {"id": sid},
        )
    empty = await fast.load(sid)
    assert empty is not None
    assert empty.history == []
    assert empty == await core.load(sid)

    async with engine.begin() as conn:
        for seq, role, content in ((1, "user", "q"), (2, "assistant", None), (3, "tool", "x")):
            await conn.execute(
                text(
                    "INSERT INTO messages (session_id, seq, role, content, prompt_tokens,"
                    " completion_tokens, created_at) VALUES (:id, :seq, :role, :content, 0, 0,"
                    " now())"
                ),
                {"id": sid, "seq": seq, "role": role, "content": content},
            )
        await conn.execute(
            text("UPDATE sessions SET message_count = 3 WHERE id = :id"), {"id": sid}
        )
    record = await fast.load(sid)
    assert record is not None
    assert record.history == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "x"},
    ]
    assert record == await core.load(sid)


async def test_the_window_is_the_last_messages_starting_at_a_user_message(
    engine: AsyncEngine,
) -> None:
    fast = PostgresTurnRepository(engine, history_limit=3)
    core = SqlTurnRepository(engine, history_limit=3)
    sid = uuid.uuid4()
    await fast.save_turn(new_turn(sid, "q0", "a0", "q1", "a1"))
    record = await fast.load(sid)
    assert record is not None
    assert [m["content"] for m in record.history] == ["q1", "a1"]  # a0 cut: not a user message
    assert record == await core.load(sid)


async def test_the_window_comes_back_in_seq_order_whatever_order_the_server_reads(
    postgres_url: str,
) -> None:
    """The fast path aggregates the window unordered and orders it itself: with the rows
    stored backwards and only sequential scans allowed, the server reads them backwards."""
    engine = create_async_engine(
        postgres_url,
        pool_size=1,
        max_overflow=0,
        connect_args={"server_settings": {"enable_indexscan": "off", "enable_bitmapscan": "off"}},
    )
    try:
        fast = PostgresTurnRepository(engine, history_limit=6)
        core = SqlTurnRepository(engine, history_limit=6)
        sid = uuid.uuid4()
        texts = [f"{'q' if i % 2 == 0 else 'a'}{i // 2}" for i in range(10)]
        await fast.save_turn(new_turn(sid, *texts))
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "WITH gone AS (DELETE FROM messages WHERE session_id = :sid RETURNING *) "
                    "INSERT INTO messages SELECT * FROM gone ORDER BY seq DESC"
                ),
                {"sid": sid},
            )
            read = await conn.execute(
                text("SELECT array_agg(seq) FROM messages WHERE session_id = :sid"), {"sid": sid}
            )
            assert read.scalar_one() == list(range(10, 0, -1))  # what the server hands over
        record = await fast.load(sid)
        assert record is not None
        assert [m["content"] for m in record.history] == texts[4:]
        assert record == await core.load(sid)
    finally:
        await engine.dispose()


def test_in_seq_order_reorders_every_column_alike() -> None:
    seqs = [7, 5, 8, 6]
    columns: list[list[Any]] = [["g", "e", "h", "f"], [70, 50, 80, 60]]
    assert in_seq_order(seqs, columns) == [["e", "f", "g", "h"], [50, 60, 70, 80]]
    in_order: list[list[Any]] = [["e", "f"], [50, 60]]
    assert in_seq_order([5, 6], in_order) is in_order  # nothing copied when in order


async def test_a_stale_turn_is_busy_and_writes_nothing(engine: AsyncEngine) -> None:
    fast, _ = stores(engine)
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


async def test_concurrent_writers_of_one_turn_leave_exactly_one(engine: AsyncEngine) -> None:
    fast, core = stores(engine)
    sid = uuid.uuid4()
    await fast.save_turn(new_turn(sid, "q0", "a0"))
    record = await fast.load(sid)
    assert record is not None
    writers = [fast, core, fast, core]  # both paths at once: they serialise on the session row
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


async def test_concurrent_new_sessions_with_one_id_leave_exactly_one(engine: AsyncEngine) -> None:
    fast, _ = stores(engine)
    sid = uuid.uuid4()
    results = await asyncio.gather(
        *(fast.save_turn(new_turn(sid, f"q-{i}", f"a-{i}")) for i in range(4)),
        return_exceptions=True,
    )
    assert sum(result is None for result in results) == 1, results
    assert all(isinstance(r, SessionBusyError) for r in results if r is not None), results
    assert len(await fast.messages(sid, limit=1000, offset=0)) == 2


async def test_a_concurrent_writer_that_took_the_seq_numbers_is_busy(engine: AsyncEngine) -> None:
    """The unique (session_id, seq) index, not the version check, refuses this one."""
    fast, _ = stores(engine)
    sid = uuid.uuid4()
    await fast.save_turn(new_turn(sid, "q0", "a0"))
    async with engine.begin() as conn:  # a writer that did not bump message_count
        await conn.execute(
            text(
                "INSERT INTO messages (session_id, seq, role, content, prompt_tokens,"
                " completion_tokens, created_at) VALUES (:id, 3, 'user', 'x', 0, 0, now())"
            ),
            {"id": sid},
        )
    record = await fast.load(sid)
    assert record is not None
    with pytest.raises(SessionBusyError) as caught:
        await fast.save_turn(follow_up(record, "q1", "a1"))
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.IntegrityError)
    after = await fast.load(sid, with_history=False)
    assert after is not None
    assert after.message_count == 2  # the session row's update was undone with the rest
    # the connection is still good: the failed statement left it idle
    await fast.save_turn(new_turn(uuid.uuid4(), "q", "a"))


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def backend_pids(engine: AsyncEngine, count: int) -> list[int]:
    """The server pids of `count` pooled connections (held together, so all distinct)."""
    connections = [await engine.connect() for _ in range(count)]
    try:
        return [
            int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            for conn in connections
        ]
    finally:
        for conn in connections:
            await conn.close()


async def terminate(pids: list[int]) -> None:
    """pg_terminate_backend, then wait until the backends are gone."""
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        for pid in pids:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(200):
            alive = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = any($1::int[])", pids
            )
            if alive == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"backends {pids} still alive")
    finally:
        await admin.close()
    await asyncio.sleep(0.05)  # let the client side read the FATAL/EOF, or not: both count


async def saved_session_on_one_connection(
    engine: AsyncEngine,
) -> tuple[PostgresTurnRepository, uuid.UUID, SessionRecord, int]:
    """A store on a one-connection pool holding one saved session, loaded once: the store,
    the session's id and record, and the pid of the pool's backend."""
    store = PostgresTurnRepository(engine, history_limit=50)
    sid = uuid.uuid4()
    await store.save_turn(new_turn(sid, "q0", "a0"))
    record = await store.load(sid)
    assert record is not None
    [pid] = await backend_pids(engine, 1)
    return store, sid, record, pid


@pytest.mark.parametrize("operation", ["load", "save_turn"])
async def test_a_killed_connection_fails_one_call_then_a_fresh_one_serves(
    postgres_url: str, operation: str
) -> None:
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        store, sid, record, old_pid = await saved_session_on_one_connection(engine)
        await terminate([old_pid])

        call: Callable[[], Any]
        if operation == "load":
            call = lambda: store.load(sid)  # noqa: E731
        else:
            call = lambda: store.save_turn(follow_up(record, "q1", "a1"))  # noqa: E731
        with pytest.raises(DatabaseUnavailableError):
            await call()
        assert checked_out(engine) == 0  # returned (invalidated), not leaked
        await call()  # on a fresh connection
        [new_pid] = await backend_pids(engine, 1)
        assert new_pid != old_pid
        after = await store.load(sid)
        assert after is not None
        assert after.message_count == (2 if operation == "load" else 4)
    finally:
        await engine.dispose()


async def test_after_a_restart_one_call_fails_not_one_per_pooled_connection(
    postgres_url: str,
) -> None:
    """All pooled connections died (a server restart): the first failure invalidates the
    pool's older connections too, as SQLAlchemy does on a disconnect."""
    engine = create_async_engine(postgres_url, pool_size=3, max_overflow=0)
    try:
        store = PostgresTurnRepository(engine, history_limit=50)
        sid = uuid.uuid4()
        await store.save_turn(new_turn(sid, "q0", "a0"))
        old = await backend_pids(engine, 3)
        await terminate(old)
        with pytest.raises(DatabaseUnavailableError):
            await store.load(sid)
        for _ in range(3):
            assert await store.load(sid) is not None
        assert not set(await backend_pids(engine, 3)) & set(old)
    finally:
        await engine.dispose()


async def test_a_cancelled_turn_closes_its_connection_and_writes_nothing(
    postgres_url: str,
) -> None:
    """Cancelled mid-statement (here: waiting on a row lock), the connection is in an
    unknown state: it is closed, not handed to the next caller, and nothing commits."""
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    locker = await asyncpg.connect(postgres_url.replace("+asyncpg", ""), timeout=5)
    try:
        store, sid, record, old_pid = await saved_session_on_one_connection(engine)
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", sid)
        blocked = asyncio.create_task(store.save_turn(follow_up(record, "q1", "a1")))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        await lock.rollback()
        assert checked_out(engine) == 0
        # the cancelled statement did not commit: the same turn still fits
        await store.save_turn(follow_up(record, "q1 again", "a1 again"))
        after = await store.load(sid)
        assert after is not None
        assert [m["content"] for m in after.history] == ["q0", "a0", "q1 again", "a1 again"]
        [new_pid] = await backend_pids(engine, 1)
        assert new_pid != old_pid
    finally:
        await locker.close()
        await engine.dispose()


async def test_no_pooled_connection_in_time_is_unavailable(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        store = PostgresTurnRepository(engine, history_limit=50)
        sid = uuid.uuid4()
        await store.save_turn(new_turn(sid, "q0", "a0"))
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            with pytest.raises(DatabaseUnavailableError) as caught:
                await store.load(sid)
            assert isinstance(caught.value.__cause__, sqlalchemy.exc.TimeoutError)
            with pytest.raises(DatabaseUnavailableError):
                await store.save_turn(new_turn(uuid.uuid4(), "q", "a"))
        assert await store.load(sid) is not None
    finally:
        await engine.dispose()


async def test_a_refused_connection_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nothing")
    try:
        store = PostgresTurnRepository(engine, history_limit=50)
        with pytest.raises(DatabaseUnavailableError):
            await store.load(uuid.uuid4())
        with pytest.raises(DatabaseUnavailableError):
            await store.save_turn(new_turn(uuid.uuid4(), "q", "a"))
        assert checked_out(engine) == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("refusal", "unavailable"),
    [
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), False),
    ],
)
async def test_what_the_server_says_when_connecting_is_classified(
    postgres_url: str, refusal: Exception, unavailable: bool
) -> None:
    """53300 and 57P03 at checkout are the server, not the data (503); a bad password is
    a misconfiguration and is not hidden as one. Both paths agree."""

    async def refuse() -> Any:
        raise refusal

    engine = create_async_engine(postgres_url, async_creator=refuse)
    try:
        for store in stores(engine):
            calls: list[Awaitable[Any]] = [
                store.load(uuid.uuid4()),
                store.save_turn(new_turn(uuid.uuid4(), "q", "a")),
            ]
            for call in calls:
                with pytest.raises(Exception) as caught:  # noqa: PT011 - classified below
                    await call
                assert isinstance(caught.value, DatabaseUnavailableError) is unavailable
                if not unavailable:
                    assert isinstance(caught.value, sqlalchemy.exc.DBAPIError)
        assert checked_out(engine) == 0
    finally:
        await engine.dispose()


async def test_turn_statements_go_through_sqlalchemy(engine: AsyncEngine) -> None:
    """Both hot statements run through SQLAlchemy's engine, so its statement events (what
    OpenTelemetry's SQLAlchemy instrumentation listens to) see every turn."""
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(str(args[2]))

    store = PostgresTurnRepository(engine, history_limit=50)
    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        sid = uuid.uuid4()
        await store.save_turn(new_turn(sid, "q", "a"))
        assert await store.load(sid) is not None
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)
    assert any("INSERT INTO sessions" in statement for statement in seen), seen
    assert any(statement.startswith("SELECT") for statement in seen), seen


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (asyncpg.exceptions.TooManyConnectionsError("too many"), True),  # 53300
        (asyncpg.exceptions.CannotConnectNowError("starting up"), True),  # 57P03
        (asyncpg.exceptions.AdminShutdownError("terminated"), True),  # 57P01
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), True),  # 08003
        (sqlalchemy.exc.InterfaceError("SELECT 1", None, Exception("connection is closed")), True),
        (ConnectionResetError("reset"), True),
        (TimeoutError(), True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit"), True),
        (asyncpg.exceptions.UniqueViolationError("dup"), False),  # 23505
        (asyncpg.exceptions.StringDataRightTruncationError("long"), False),  # 22001
        (ValueError("not the database"), False),
    ],
)
def test_what_counts_as_the_server_being_unavailable(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


async def test_api_answers_503_for_a_killed_connection_then_recovers(postgres_url: str) -> None:
    settings = make_settings(database_url=postgres_url, db_pool_size=1, db_max_overflow=0)
    async with running_app(settings) as (app, client):
        first = await client.post("/query", json={"message": "hello"})
        assert first.status_code == 200, first.text
        sid = first.json()["session_id"]
        engine: AsyncEngine = app.state.runtime.turns.engine
        await terminate(await backend_pids(engine, 1))
        failed = await client.post("/query", json={"message": "still there?", "session_id": sid})
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "database_unavailable"
        assert int(failed.headers["retry-after"]) >= 1
        again = await client.post("/query", json={"message": "still there?", "session_id": sid})
        assert again.status_code == 200, again.text
        assert again.json()["session_id"] == sid
    async with running_app(settings) as (app, _):
        record = await app.state.runtime.turns.load(uuid.UUID(sid))
    assert record is not None
    assert record.message_count == 4
