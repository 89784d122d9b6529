"""The turn repository on SQLite and Postgres (each database's own implementation): atomic
turns, bounded history, no interleaving."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.domain import StoredMessage, Turn
from app.errors import SessionBusyError
from app.storage import PostgresTurnRepository, SqlTurnRepository, open_repository
from app.storage.turns import is_unavailable
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


Repository = PostgresTurnRepository | SqlTurnRepository
Repositories = Callable[[int], Awaitable[Repository]]


@pytest.fixture
async def repositories(database_url: str) -> AsyncIterator[Repositories]:
    """`await repositories(history_limit)`: the database's repository, closed afterwards."""
    opened: list[Repository] = []

    async def make(history_limit: int) -> Repository:
        settings = make_settings(database_url=database_url, history_max_messages=history_limit)
        opened.append(await open_repository(settings))
        return opened[-1]

    yield make
    for repository in opened:
        await repository.aclose()


def turn(
    session_id: uuid.UUID, expected: int, *texts: str, is_new: bool = False, previous: str = ""
) -> Turn:
    messages = [
        StoredMessage({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        for i, text in enumerate(texts)
    ]
    return Turn(
        session_id=session_id,
        agent="assistant",
        owner=None,
        is_new=is_new,
        expected_count=expected,
        previous_digest=previous,
        messages=messages,
        request_id="req",
    )


async def test_history_is_bounded_and_starts_at_a_user_message(repositories: Repositories) -> None:
    store = await repositories(5)
    sid = uuid.uuid4()
    await store.save_turn(turn(sid, 0, "q0", "a0", is_new=True))
    count = 2
    for i in range(1, 6):
        await store.save_turn(turn(sid, count, f"q{i}", f"a{i}"))
        count += 2
    record = await store.load(sid)
    assert record is not None
    assert record.message_count == 12
    # the last 5 messages are a3 q4 a4 q5 a5; a window must start at a user message
    assert [m["content"] for m in record.history] == ["q4", "a4", "q5", "a5"]
    assert record.history[0]["role"] == "user"


async def test_a_stale_turn_is_refused_and_writes_nothing(repositories: Repositories) -> None:
    store = await repositories(50)
    sid = uuid.uuid4()
    await store.save_turn(turn(sid, 0, "q0", "a0", is_new=True))
    await store.save_turn(turn(sid, 2, "q1", "a1"))
    with pytest.raises(SessionBusyError):
        await store.save_turn(turn(sid, 2, "late", "late answer"))
    assert len(await store.messages(sid, limit=1000, offset=0)) == 4
    record = await store.load(sid)
    assert record is not None
    assert [m["content"] for m in record.history] == ["q0", "a0", "q1", "a1"]


async def test_a_new_session_with_a_taken_id_is_refused(repositories: Repositories) -> None:
    store = await repositories(50)
    sid = uuid.uuid4()
    await store.save_turn(turn(sid, 0, "q0", "a0", is_new=True))
    with pytest.raises(SessionBusyError):
        await store.save_turn(turn(sid, 0, "other", "other", is_new=True))
    assert len(await store.messages(sid, limit=1000, offset=0)) == 2


async def test_tool_messages_round_trip(repositories: Repositories) -> None:
    store = await repositories(50)
    sid = uuid.uuid4()
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'},
    }
    await store.save_turn(
        Turn(
            session_id=sid,
            agent="tools",
            owner=None,
            is_new=True,
            expected_count=0,
            previous_digest="",
            messages=[
                StoredMessage({"role": "user", "content": "1+1?"}),
                StoredMessage({"role": "assistant", "content": None, "tool_calls": [call]}, 10, 5),
                StoredMessage(
                    {"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "2"}
                ),
                StoredMessage({"role": "assistant", "content": "It is 2."}, 20, 4),
            ],
            request_id="r1",
        )
    )
    record = await store.load(sid)
    assert record is not None
    assert record.history == [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "2"},
        {"role": "assistant", "content": "It is 2."},
    ]


async def test_delete_removes_session_and_messages(repositories: Repositories) -> None:
    store = await repositories(50)
    sid = uuid.uuid4()
    await store.save_turn(turn(sid, 0, "q0", "a0", is_new=True))
    assert await store.delete(sid) is True
    assert await store.load(sid) is None
    assert len(await store.messages(sid, limit=1000, offset=0)) == 0
    assert await store.delete(sid) is False


async def test_history_digest_names_the_whole_conversation(repositories: Repositories) -> None:
    store = await repositories(2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for sid, first in ((a, "same"), (b, "same"), (c, "different")):
        await store.save_turn(turn(sid, 0, first, "answer", is_new=True))
    ra, rb, rc = [await store.load(sid) for sid in (a, b, c)]
    assert ra is not None
    assert rb is not None
    assert rc is not None
    assert ra.history_digest == rb.history_digest != rc.history_digest
    assert ra.history_digest != ""
    # b and c continue with identical turns: the recent window is the same, the digest is not
    await store.save_turn(turn(b, 2, "q", "a", previous=rb.history_digest))
    await store.save_turn(turn(c, 2, "q", "a", previous=rc.history_digest))
    rb2, rc2 = await store.load(b), await store.load(c)
    assert rb2 is not None
    assert rc2 is not None
    assert rb2.history == rc2.history
    assert rb2.history_digest != rc2.history_digest


async def test_what_a_model_may_send_is_stored(repositories: Repositories) -> None:
    """Tool names and ids of any length, and NUL characters, never fail the write."""
    store = await repositories(50)
    sid = uuid.uuid4()
    name = "n" * 300
    call_id = "c" * 300
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
    await store.save_turn(
        Turn(
            session_id=sid,
            agent="tools",
            owner=None,
            is_new=True,
            expected_count=0,
            previous_digest="",
            messages=[
                StoredMessage({"role": "user", "content": "go"}),
                StoredMessage({"role": "assistant", "content": None, "tool_calls": [call]}),
                StoredMessage(
                    {"role": "tool", "tool_call_id": call_id, "name": name, "content": "x"}
                ),
                StoredMessage({"role": "assistant", "content": "nul \x00 inside"}),
            ],
            request_id="r",
        )
    )
    record = await store.load(sid)
    assert record is not None
    assert record.history[2]["name"] == name
    assert record.history[2]["tool_call_id"] == call_id
    assert record.history[3]["content"] == "nul \ufffd inside"


class _FakePgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "unavailable"),
    [("53300", True), ("57P03", True), ("08006", True), ("23505", False), ("22P02", False)],
)
def test_server_side_refusals_count_as_unavailable(sqlstate: str, unavailable: bool) -> None:
    """too many connections / starting up / connection failure: the server, not the data."""
    import sqlalchemy.exc

    error = sqlalchemy.exc.DBAPIError("SELECT 1", None, _FakePgError(sqlstate))
    assert is_unavailable(error) is unavailable
