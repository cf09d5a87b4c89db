"""runs.events: the backlog a reader's events wait in (merging, overflow), their encoding per dialect, error events."""

import asyncio
import json

import pytest

from bankagent.exceptions import NotFound, ThreadBusy, UnknownAgentType
from runs.events import Backlog, BacklogFull, Dialect, encode, error_event


def delta(token: str, *, message_id: str = "m1", request_id: str | None = None) -> dict:
    event = {"event": "text_delta", "message_id": message_id, "token": token}
    if request_id is not None:
        event["request_id"] = request_id
    return event


def tool_call(name: str = "customer_balance", *, message_id: str = "m1") -> dict:
    return {"event": "tool_call", "message_id": message_id, "tool_call": {"name": name, "args": {}}}


def backlog(*, cumulative: bool, max_events: int = 100) -> Backlog:
    return Backlog(cumulative=cumulative, max_events=max_events)


# --- merging ----------------------------------------------------------------------------------------------------------


async def test_structured_deltas_of_one_answer_merge_into_the_latest():
    waiting = backlog(cumulative=True)
    waiting.put_many([delta('{"a":"x"}'), delta('{"a":"xy"}'), delta('{"a":"xyz","b":1}')])

    assert await waiting.take() == [delta('{"a":"xyz","b":1}')]


async def test_text_deltas_of_one_answer_merge_by_concatenation():
    waiting = backlog(cumulative=False)
    waiting.put_many([delta("Hello"), delta(", "), delta("world")])

    assert await waiting.take() == [delta("Hello, world")]


async def test_merged_text_delta_keeps_the_fields_of_its_answer_and_request():
    waiting = backlog(cumulative=False)
    waiting.put_many([delta("a", request_id="r1"), delta("b", request_id="r1")])

    assert await waiting.take() == [{"event": "text_delta", "message_id": "m1", "token": "ab", "request_id": "r1"}]


@pytest.mark.parametrize("cumulative", [True, False], ids=["structured", "text"])
async def test_deltas_of_different_answers_do_not_merge(cumulative):
    waiting = backlog(cumulative=cumulative)
    events = [delta("a", message_id="m1"), delta("b", message_id="m2"), delta("c", message_id="m1")]
    waiting.put_many(events)

    assert await waiting.take() == events


@pytest.mark.parametrize("cumulative", [True, False], ids=["structured", "text"])
async def test_deltas_of_different_requests_do_not_merge(cumulative):
    waiting = backlog(cumulative=cumulative)
    events = [delta("a", request_id="r1"), delta("b", request_id="r2"), delta("c")]
    waiting.put_many(events)

    assert await waiting.take() == events


@pytest.mark.parametrize("cumulative", [True, False], ids=["structured", "text"])
async def test_only_consecutive_deltas_merge(cumulative):
    waiting = backlog(cumulative=cumulative)
    events = [delta("a"), tool_call(), delta("b")]
    waiting.put_many(events)

    assert await waiting.take() == events


async def test_events_other_than_deltas_never_merge():
    waiting = backlog(cumulative=False)
    events = [tool_call(), tool_call(), {"event": "done"}, {"event": "done"}]
    waiting.put_many(events)

    assert await waiting.take() == events


async def test_a_delta_does_not_merge_into_one_already_taken():
    waiting = backlog(cumulative=False)
    waiting.put(delta("a"))
    assert await waiting.take() == [delta("a")]

    waiting.put(delta("b"))

    assert await waiting.take() == [delta("b")]


# --- taking -----------------------------------------------------------------------------------------------------------


async def test_take_returns_everything_waiting_in_order_and_empties_the_backlog():
    waiting = backlog(cumulative=False)
    events = [{"event": "message_started", "message_id": "m1"}, delta("a"), {"event": "done"}]
    waiting.put_many(events)

    assert await waiting.take() == events
    assert not waiting.events


async def test_take_on_an_empty_backlog_waits_for_the_next_event():
    waiting = backlog(cumulative=False)
    taking = asyncio.create_task(waiting.take())
    await asyncio.sleep(0)  # one turn of the loop: the reader reaches its wait
    assert not taking.done()

    waiting.put(delta("a"))

    async with asyncio.timeout(5):
        assert await taking == [delta("a")]


# --- overflow ---------------------------------------------------------------------------------------------------------


async def test_put_past_max_events_raises_backlog_full_and_every_later_put_too():
    waiting = backlog(cumulative=False, max_events=2)
    waiting.put_many([tool_call(), tool_call()])

    with pytest.raises(BacklogFull):
        waiting.put(tool_call())
    with pytest.raises(BacklogFull):
        waiting.put({"event": "done"})
    # A delta that could merge into the last waiting event does not bring the reader back either.
    with pytest.raises(BacklogFull):
        waiting.put(delta("a"))
    assert waiting.overflowed


async def test_take_after_an_overflow_raises_backlog_full_although_events_wait():
    waiting = backlog(cumulative=False, max_events=1)
    waiting.put(tool_call())
    with pytest.raises(BacklogFull):
        waiting.put(tool_call())

    assert waiting.events
    with pytest.raises(BacklogFull):
        await waiting.take()


async def test_a_reader_waiting_to_take_is_told_when_it_is_dropped():
    waiting = backlog(cumulative=False, max_events=0)
    taking = asyncio.create_task(waiting.take())
    await asyncio.sleep(0)  # one turn of the loop: the reader reaches its wait
    assert not taking.done()

    with pytest.raises(BacklogFull):
        waiting.put(tool_call())

    async with asyncio.timeout(5):
        with pytest.raises(BacklogFull):
            await taking


@pytest.mark.parametrize("cumulative", [True, False], ids=["structured", "text"])
async def test_merged_deltas_count_once_towards_max_events(cumulative):
    waiting = backlog(cumulative=cumulative, max_events=2)
    waiting.put(tool_call())
    waiting.put_many([delta(str(index)) for index in range(100)])

    taken = await waiting.take()

    assert [event["event"] for event in taken] == ["tool_call", "text_delta"]
    assert taken[1]["token"] == ("99" if cumulative else "".join(str(index) for index in range(100)))


async def test_put_many_stops_at_the_overflow():
    waiting = backlog(cumulative=False, max_events=2)

    with pytest.raises(BacklogFull):
        waiting.put_many([tool_call(), tool_call(), tool_call(), tool_call()])

    assert len(waiting.events) == 2


# --- encoding ---------------------------------------------------------------------------------------------------------


EVENTS = [
    {"event": "message_created", "message": {"id": "u1", "role": "user", "content": "Où est ma carte ?"}},
    {"event": "message_started", "message_id": "m1"},
    tool_call(),
    {"event": "tool_result", "message_id": "m1", "tool_result": {"name": "customer_balance", "content": 1.5}},
    delta("Voilà"),
    {"event": "message_complete", "message_id": "m1", "status": "complete", "content": "Voilà", "output": None},
    {"event": "error", "error": "Not found.", "error_type": "not_found"},
    {"event": "done"},
]


def test_standard_dialect_encodes_every_event_as_it_is():
    for event in EVENTS:
        assert json.loads(encode(event, Dialect.STANDARD)) == event


def test_encoding_keeps_text_unescaped_on_one_line():
    line = encode(EVENTS[0], Dialect.STANDARD)

    assert "Où est ma carte ?" in line
    assert "\n" not in encode(delta("two\nlines"), Dialect.STANDARD)


def test_legacy_dialect_names_deltas_token_and_leaves_tool_events_out():
    encoded = [encode(event, Dialect.LEGACY) for event in EVENTS]

    assert encoded[2] is None and encoded[3] is None
    decoded = [json.loads(line) for line in encoded if line is not None]
    assert [event["event"] for event in decoded] == [
        "message_created",
        "message_started",
        "token",
        "message_complete",
        "error",
        "done",
    ]
    assert decoded[2] == {"event": "token", "message_id": "m1", "token": "Voilà"}
    # Every other event is the standard one.
    assert [event for event in decoded if event["event"] != "token"] == [
        event for event in EVENTS if event["event"] not in ("text_delta", "tool_call", "tool_result")
    ]


def test_legacy_encoding_leaves_the_event_itself_unchanged():
    event = delta("a")

    encode(event, Dialect.LEGACY)

    assert event["event"] == "text_delta"


def test_dialects_are_named_as_api_keys_store_them():
    assert Dialect("standard") is Dialect.STANDARD
    assert Dialect("legacy") is Dialect.LEGACY


# --- error events -----------------------------------------------------------------------------------------------------


def test_error_event_carries_the_code_and_message_of_the_http_error():
    error = ThreadBusy()

    assert error_event(error) == {"event": "error", "error": error.message, "error_type": "thread_busy"}


def test_error_event_adds_the_fields_given():
    event = error_event(NotFound("Thread not found."), message_id="m1", request_id="r1")

    assert event == {
        "event": "error",
        "error": "Thread not found.",
        "error_type": "not_found",
        "message_id": "m1",
        "request_id": "r1",
    }


def test_error_event_carries_the_details_of_the_error_when_it_has_any():
    event = error_event(UnknownAgentType.of("nope", ["bank_support", "general_chat"]))

    assert event["error_type"] == "unknown_agent_type"
    assert event["details"] == {"known_agent_types": ["bank_support", "general_chat"]}
    assert "nope" in event["error"]


def test_encoded_event_has_no_character_that_splits_a_line_for_python_clients():
    event = {"event": "text_delta", "message_id": "m", "token": "one\u2028two\x85three\u2029four é"}

    text = encode(event, Dialect.STANDARD)

    assert text.splitlines() == [text]
    assert json.loads(text) == event
