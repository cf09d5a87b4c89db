"""Unit tests of the write services and read selectors of threads."""

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_core import to_jsonable_python

from bankagent.exceptions import NotFound, ThreadBusy
from threads import selectors, services
from threads.models import Message, Thread


def exchange(prompt: str, answer: str) -> list[Any]:
    """The stored pydantic-ai message list of one plain exchange."""
    return to_jsonable_python(
        [ModelRequest(parts=[UserPromptPart(content=prompt)]), ModelResponse(parts=[TextPart(content=answer)])]
    )


LEASE_SECONDS = 30


def start(thread: Thread, query: str, *, lease_seconds: float = 0) -> tuple[Message, Message]:
    """A turn whose run is still going; with the default lease of 0 the next turn may start at once."""
    return services.turn_start(thread=thread, query=query, run_token=uuid.uuid4(), lease_seconds=lease_seconds)


def turn(thread: Thread, prompt: str, *, status: str = "complete", store_messages: bool = True) -> Message:
    """A turn saved the way the runner saves it, lease taken and released; returns the assistant message."""
    run_token = uuid.uuid4()
    _, assistant = services.turn_start(thread=thread, query=prompt, run_token=run_token, lease_seconds=LEASE_SECONDS)
    return services.turn_finish(
        message=assistant,
        run_token=run_token,
        status=status,
        content=f"answer to {prompt}",
        output=None,
        metadata={"model": "test"},
        model_messages=exchange(prompt, f"answer to {prompt}") if store_messages else None,
    )


def prompts(history: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in history
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


# turn_start


def test_turn_start_saves_the_query_and_a_pending_answer_with_consecutive_seq_numbers(make_thread):
    thread = make_thread()

    pairs = [start(thread, f"q{index}") for index in range(3)]

    stored = list(Message.objects.filter(thread=thread).order_by("seq"))
    assert [m.seq for m in stored] == [1, 2, 3, 4, 5, 6]
    assert [(m.role, m.status, m.content) for m in stored[:2]] == [
        ("user", "complete", "q0"),
        ("assistant", "incomplete", ""),
    ]
    assert [(user.seq, assistant.seq) for user, assistant in pairs] == [(1, 2), (3, 4), (5, 6)]
    thread.refresh_from_db()
    assert thread.last_seq == 6


def test_turn_start_numbers_from_the_database_not_from_a_stale_thread_instance(make_thread):
    thread = make_thread()
    stale = Thread.objects.get(pk=thread.pk)
    start(thread, "first")

    user_message, assistant = start(stale, "second")

    assert (user_message.seq, assistant.seq) == (3, 4)
    assert sorted(Message.objects.filter(thread=thread).values_list("seq", flat=True)) == [1, 2, 3, 4]


def test_turn_start_bumps_the_thread_updated_at(make_thread):
    thread = make_thread()
    long_ago = timezone.now() - timedelta(days=1)
    Thread.objects.filter(pk=thread.pk).update(updated_at=long_ago)

    start(thread, "hello")

    thread.refresh_from_db()
    assert thread.updated_at > long_ago


def test_messages_sharing_a_timestamp_keep_their_turn_order(make_thread):
    thread = make_thread()
    for index in range(6):
        start(thread, f"q{index}")
    Message.objects.filter(thread=thread).update(created_at=timezone.now())

    listed = list(selectors.message_list(thread=thread))
    latest, has_more = selectors.thread_latest_messages(thread=thread, limit=4)

    assert [m.seq for m in listed] == list(range(1, 13))
    assert [m.content for m in listed if m.role == "user"] == [f"q{index}" for index in range(6)]
    assert [m.seq for m in latest] == [9, 10, 11, 12]
    assert has_more is True


def test_thread_latest_messages_without_older_ones_has_no_more(make_thread):
    thread = make_thread()
    start(thread, "only")

    latest, has_more = selectors.thread_latest_messages(thread=thread, limit=2)

    assert [m.seq for m in latest] == [1, 2]
    assert has_more is False


def test_turn_start_refuses_a_second_run_while_the_lease_is_live_and_writes_nothing(make_thread):
    thread = make_thread()
    start(thread, "first", lease_seconds=LEASE_SECONDS)
    before = Thread.objects.filter(pk=thread.pk).values("last_seq", "run_token", "run_heartbeat", "updated_at").get()

    with pytest.raises(ThreadBusy) as error:
        start(thread, "second", lease_seconds=LEASE_SECONDS)

    assert (error.value.status, error.value.code) == (409, "thread_busy")
    assert Message.objects.filter(thread=thread).count() == 2
    after = Thread.objects.filter(pk=thread.pk).values("last_seq", "run_token", "run_heartbeat", "updated_at").get()
    assert after == before


def test_turn_start_takes_over_a_lapsed_lease(make_thread):
    thread = make_thread()
    start(thread, "crashed run", lease_seconds=LEASE_SECONDS)
    Thread.objects.filter(pk=thread.pk).update(run_heartbeat=timezone.now() - timedelta(seconds=LEASE_SECONDS + 1))

    user_message, assistant = start(thread, "next run", lease_seconds=LEASE_SECONDS)

    assert (user_message.seq, assistant.seq) == (3, 4)


def test_turn_finish_releases_the_lease_so_the_next_turn_can_start(make_thread):
    thread = make_thread()
    turn(thread, "first")

    user_message, _ = start(thread, "second", lease_seconds=LEASE_SECONDS)

    assert user_message.seq == 3


def test_turn_finish_of_a_run_that_lost_its_lease_leaves_the_new_runs_lease(make_thread):
    thread = make_thread()
    old_token, new_token = uuid.uuid4(), uuid.uuid4()
    _, old_assistant = services.turn_start(thread=thread, query="old", run_token=old_token, lease_seconds=LEASE_SECONDS)
    Thread.objects.filter(pk=thread.pk).update(run_heartbeat=timezone.now() - timedelta(seconds=LEASE_SECONDS + 1))
    services.turn_start(thread=thread, query="new", run_token=new_token, lease_seconds=LEASE_SECONDS)

    services.turn_finish(
        message=old_assistant, run_token=old_token, status="complete", content="late", output=None, metadata={}
    )

    thread.refresh_from_db()
    assert thread.run_token == new_token
    with pytest.raises(ThreadBusy):
        start(thread, "third", lease_seconds=LEASE_SECONDS)


# turn_finish


def test_turn_finish_fills_the_assistant_message_and_bumps_the_thread(make_thread):
    thread = make_thread()
    run_token = uuid.uuid4()
    _, assistant = services.turn_start(
        thread=thread, query="What is my balance?", run_token=run_token, lease_seconds=LEASE_SECONDS
    )
    Message.objects.filter(pk=assistant.pk).update(metadata={"request_id": "r1"})
    assistant.refresh_from_db()
    long_ago = timezone.now() - timedelta(days=1)
    Thread.objects.filter(pk=thread.pk).update(updated_at=long_ago)
    output = {"support_advice": "Fine.", "block_card": False, "risk_level": 0, "follow_up_actions": []}
    stored = exchange("What is my balance?", "Fine.")

    services.turn_finish(
        message=assistant,
        run_token=run_token,
        status=Message.Status.COMPLETE,
        content='{"support_advice": "Fine."}',
        output=output,
        metadata={"model": "demo", "duration_ms": 5, "usage": {"total_tokens": 3}},
        model_messages=stored,
    )

    saved = Message.objects.get(pk=assistant.pk)
    assert (saved.status, saved.content, saved.output) == ("complete", '{"support_advice": "Fine."}', output)
    assert saved.metadata == {"request_id": "r1", "model": "demo", "duration_ms": 5, "usage": {"total_tokens": 3}}
    assert saved.model_messages == stored
    assert (saved.seq, saved.role) == (2, "assistant")
    thread.refresh_from_db()
    assert thread.updated_at > long_ago


def test_turn_finish_of_a_failed_run_keeps_the_user_message(make_thread):
    thread = make_thread()
    run_token = uuid.uuid4()
    user_message, assistant = services.turn_start(
        thread=thread, query="hello", run_token=run_token, lease_seconds=LEASE_SECONDS
    )

    services.turn_finish(
        message=assistant, run_token=run_token, status="failed", content="", output=None, metadata={"error": "x"}
    )

    assert Message.objects.get(pk=user_message.pk).content == "hello"
    saved = Message.objects.get(pk=assistant.pk)
    assert (saved.status, saved.model_messages, saved.metadata) == ("failed", None, {"error": "x"})


# thread_history


def test_thread_history_replays_finished_exchanges_in_order(make_thread):
    thread = make_thread()
    for prompt in ["one", "two", "three"]:
        turn(thread, prompt)

    history = selectors.thread_history(thread=thread, turns=10)

    assert [type(message) for message in history] == [ModelRequest, ModelResponse] * 3
    assert prompts(history) == ["one", "two", "three"]
    assert [part.content for m in history if isinstance(m, ModelResponse) for part in m.parts] == [
        "answer to one",
        "answer to two",
        "answer to three",
    ]


def test_thread_history_is_limited_to_the_last_n_turns(make_thread):
    thread = make_thread()
    for index in range(5):
        turn(thread, f"q{index}")

    assert prompts(selectors.thread_history(thread=thread, turns=2)) == ["q3", "q4"]
    assert prompts(selectors.thread_history(thread=thread, turns=1)) == ["q4"]


def test_thread_history_skips_failed_and_unfinished_exchanges(make_thread):
    thread = make_thread()
    turn(thread, "kept")
    turn(thread, "model failed", status="failed", store_messages=False)
    turn(thread, "also kept")
    start(thread, "still running")

    history = selectors.thread_history(thread=thread, turns=10)

    assert prompts(history) == ["kept", "also kept"]


def test_thread_history_skips_failed_and_incomplete_exchanges_even_with_stored_model_messages(make_thread):
    thread = make_thread()
    turn(thread, "kept")
    turn(thread, "cancelled", status="incomplete")
    turn(thread, "failed", status="failed")
    turn(thread, "also kept")

    history = selectors.thread_history(thread=thread, turns=10)

    assert prompts(history) == ["kept", "also kept"]


def test_thread_history_counts_turns_among_finished_exchanges_only(make_thread):
    thread = make_thread()
    turn(thread, "first")
    turn(thread, "second")
    turn(thread, "failed", status="failed", store_messages=False)
    start(thread, "running")

    assert prompts(selectors.thread_history(thread=thread, turns=2)) == ["first", "second"]


def test_thread_history_replays_tool_calls_and_returns(make_thread):
    thread = make_thread()
    run_token = uuid.uuid4()
    _, assistant = services.turn_start(
        thread=thread, query="What is my balance?", run_token=run_token, lease_seconds=LEASE_SECONDS
    )
    run = [
        ModelRequest(parts=[UserPromptPart(content="What is my balance?")]),
        ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": False}, tool_call_id="c1")]),
        ModelRequest(parts=[ToolReturnPart("customer_balance", 1123.45, tool_call_id="c1")]),
        ModelResponse(parts=[TextPart(content="Your balance is $1,123.45.")]),
    ]
    services.turn_finish(
        message=assistant,
        run_token=run_token,
        status="complete",
        content="Your balance is $1,123.45.",
        output=None,
        metadata={},
        model_messages=to_jsonable_python(run),
    )

    history = selectors.thread_history(thread=thread, turns=5)

    call = history[1].parts[0]
    result = history[2].parts[0]
    assert isinstance(call, ToolCallPart)
    assert (call.tool_name, call.args_as_dict(), call.tool_call_id) == (
        "customer_balance",
        {"include_pending": False},
        "c1",
    )
    assert isinstance(result, ToolReturnPart)
    assert (result.tool_name, result.content, result.tool_call_id) == ("customer_balance", 1123.45, "c1")


def test_thread_history_of_another_thread_is_not_mixed_in(make_thread):
    thread, other = make_thread(), make_thread()
    turn(other, "elsewhere")
    turn(thread, "here")

    assert prompts(selectors.thread_history(thread=thread, turns=10)) == ["here"]
    assert selectors.thread_history(thread=make_thread(), turns=10) == []


# thread_get_for_user, thread_list, parse_thread_id


def test_thread_get_for_user_returns_the_users_own_thread(make_thread, user_id):
    thread = make_thread()

    assert selectors.thread_get_for_user(thread_id=thread.id, user_id=user_id) == thread


def test_thread_get_for_user_raises_not_found_for_another_users_thread_like_a_missing_one(
    make_thread, user_id, other_user_id
):
    foreign = make_thread(user=other_user_id)

    with pytest.raises(NotFound) as foreign_error:
        selectors.thread_get_for_user(thread_id=foreign.id, user_id=user_id)
    with pytest.raises(NotFound) as missing_error:
        selectors.thread_get_for_user(thread_id=uuid.uuid4(), user_id=user_id)

    assert foreign_error.value.status == 404
    assert foreign_error.value.as_dict() == missing_error.value.as_dict()


def test_thread_list_holds_only_the_users_threads_and_filters_by_agent_type(make_thread, user_id, other_user_id):
    bank, chat = make_thread(), make_thread(agent_type="general_chat")
    make_thread(user=other_user_id)

    assert set(selectors.thread_list(user_id=user_id)) == {bank, chat}
    assert list(selectors.thread_list(user_id=user_id, agent_type="general_chat")) == [chat]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "123",
        "null",
        "../admin",
        "123e4567-e89b-12d3-a456-42661417400",
        "123e4567-e89b-12d3-a456-4266141740000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567-e89b-12d3-a456-426614174000\x00",
    ],
)
def test_parse_thread_id_rejects_non_uuids_as_not_found(raw):
    with pytest.raises(NotFound) as error:
        selectors.parse_thread_id(raw)

    assert error.value.status == 404
    assert error.value.code == "not_found"


def test_parse_thread_id_accepts_any_uuid_spelling():
    expected = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")

    for raw in ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"]:
        assert selectors.parse_thread_id(raw) == expected


# thread_create, thread_update, thread_delete


def test_thread_update_changes_only_the_fields_given_and_none_clears_the_title(make_thread):
    thread = make_thread(title="title", metadata={"a": 1})

    services.thread_update(thread=thread, metadata={"b": 2})
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("title", {"b": 2})

    services.thread_update(thread=thread, title=None)
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == (None, {"b": 2})


def test_thread_delete_removes_its_messages(make_thread):
    thread, kept = make_thread(), make_thread()
    start(thread, "gone")
    start(kept, "kept")

    services.thread_delete(thread=thread)

    assert list(Message.objects.values_list("content", flat=True).filter(role="user")) == ["kept"]


def test_thread_create_defaults_to_empty_metadata(user_id, db):
    thread = services.thread_create(user_id=user_id, agent_type="general_chat")

    assert Thread.objects.get(pk=thread.pk).metadata == {}
    assert thread.title is None
