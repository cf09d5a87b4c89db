"""Unit tests of a run's writes (runs.services: the lease on the answer, checkpoints, interrupted runs) and of the
history it reads (runs.selectors)."""

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext
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

import runs.services
from bankagent.exceptions import NotFound, ThreadBusy
from runs.selectors import Running, ThreadState, run_answer_state, thread_state
from runs.services import (
    INTERRUPTED,
    RunStart,
    run_begin,
    run_finish,
    runs_interrupt,
    runs_renew,
)
from threads.models import Message, Thread

LEASE_SECONDS = 30


def renew(message_id, checkpoint=None) -> bool:
    """Renew one run's lease as the keeper does (with its checkpoint, if any); whether the run still holds it."""
    checkpoints = {message_id: checkpoint} if checkpoint is not None else {}
    return message_id not in runs_renew(message_ids=[message_id], checkpoints=checkpoints, lease_seconds=LEASE_SECONDS)


def exchange(prompt: str, answer: str) -> list[Any]:
    """The stored pydantic-ai message list of one plain exchange."""
    return to_jsonable_python(
        [ModelRequest(parts=[UserPromptPart(content=prompt)]), ModelResponse(parts=[TextPart(content=answer)])]
    )


def begin(
    thread: Thread,
    query: str = "Hello",
    *,
    user_id: uuid.UUID | None = None,
    history_turns: int = 10,
    deps_for=None,
) -> RunStart:
    return run_begin(
        thread_id=thread.pk,
        user_id=user_id or thread.user_id,
        query=query,
        model_label="test",
        lease_seconds=LEASE_SECONDS,
        history_turns=history_turns,
        deps_for=deps_for or (lambda agent_type, user_id: None),
    )


def finish(message: Message, *, status: str = "complete", content: str = "done", **fields: Any) -> bool:
    fields.setdefault("output", None)
    fields.setdefault("metadata", {"model": "test"})
    return run_finish(message_id=message.pk, status=status, content=content, **fields)


def turn(make_turn, thread: Thread, prompt: str, *, status: str = "complete", store_messages: bool = True) -> Message:
    """A finished exchange whose answer is "answer to <prompt>"; returns the assistant message."""
    answer = f"answer to {prompt}"
    stored = exchange(prompt, answer) if store_messages else None
    return make_turn(thread, query=prompt, answer=answer, status=status, model_messages=stored)[1]


def lapse(message: Message) -> None:
    """The lease of a run whose process died: it was not renewed in time."""
    Message.objects.filter(pk=message.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def fetch(message: Message) -> Message:
    return Message.objects.get(pk=message.pk)


def prompts(history: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in history
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


@pytest.fixture
def frozen_now(monkeypatch):
    """timezone.now() stands still at a moment the test can move."""
    now = [timezone.now().replace(microsecond=0)]
    monkeypatch.setattr(timezone, "now", lambda: now[0])

    class Clock:
        @property
        def now(self) -> datetime:
            return now[0]

        def advance(self, seconds: float) -> None:
            now[0] += timedelta(seconds=seconds)

    return Clock()


# run_begin


def test_run_begin_saves_the_query_and_an_in_progress_answer_that_holds_the_lease(make_thread, frozen_now):
    thread = make_thread()

    start = begin(thread, "What is my balance?")

    stored = list(Message.objects.filter(thread=thread).order_by("seq"))
    assert [(m.seq, m.role, m.status, m.content) for m in stored] == [
        (1, "user", "complete", "What is my balance?"),
        (2, "assistant", "in_progress", ""),
    ]
    assert [m.pk for m in stored] == [start.user_message.pk, start.assistant_message.pk]
    assert stored[0].lease_expires_at is None
    assert stored[1].lease_expires_at == frozen_now.now + timedelta(seconds=LEASE_SECONDS)
    assert stored[1].metadata == {"model": "test"}
    thread.refresh_from_db()
    assert (thread.last_seq, start.thread.last_seq) == (2, 2)


def test_run_begin_numbers_turns_consecutively(make_thread):
    thread = make_thread()

    pairs = []
    for index in range(3):
        start = begin(thread, f"q{index}")
        finish(start.assistant_message)
        pairs.append((start.user_message.seq, start.assistant_message.seq))

    assert pairs == [(1, 2), (3, 4), (5, 6)]
    assert sorted(Message.objects.filter(thread=thread).values_list("seq", flat=True)) == [1, 2, 3, 4, 5, 6]
    thread.refresh_from_db()
    assert thread.last_seq == 6


def test_run_begin_numbers_from_the_database_not_from_a_stale_thread_instance(make_thread, make_turn):
    thread = make_thread()
    stale = Thread.objects.get(pk=thread.pk)
    make_turn(thread)

    start = begin(stale, "second")

    assert (start.user_message.seq, start.assistant_message.seq) == (3, 4)


def test_run_begin_bumps_the_thread_updated_at(make_thread, frozen_now):
    thread = make_thread()
    Thread.objects.filter(pk=thread.pk).update(updated_at=frozen_now.now - timedelta(days=1))

    begin(thread, "hello")

    thread.refresh_from_db()
    assert thread.updated_at == frozen_now.now


def test_run_begin_builds_the_deps_for_the_threads_agent_and_user(make_thread, user_id):
    thread = make_thread(agent_type="general_chat")
    asked = []

    start = begin(thread, deps_for=lambda agent_type, user: asked.append((agent_type, user)) or "deps")

    assert asked == [("general_chat", user_id)]
    assert start.deps == "deps"


def test_run_begin_on_another_users_thread_is_not_found_like_a_missing_one_and_writes_nothing(
    make_thread, other_user_id, user_id
):
    foreign = make_thread(user=other_user_id)

    with pytest.raises(NotFound) as foreign_error:
        begin(foreign, user_id=user_id)
    with pytest.raises(NotFound) as missing_error:
        run_begin(
            thread_id=uuid.uuid4(),
            user_id=user_id,
            query="Hello",
            model_label="test",
            lease_seconds=LEASE_SECONDS,
            history_turns=10,
            deps_for=lambda agent_type, user_id: None,
        )

    assert foreign_error.value.as_dict() == missing_error.value.as_dict()
    assert not Message.objects.exists()
    assert Thread.objects.get(pk=foreign.pk).last_seq == 0


def test_run_begin_refuses_a_live_lease_with_thread_busy_and_writes_nothing(make_thread):
    thread = make_thread()
    running = begin(thread, "first")
    Message.objects.filter(pk=running.assistant_message.pk).update(content="Your bal")
    before = (
        Thread.objects.filter(pk=thread.pk).values().get(),
        list(Message.objects.filter(thread=thread).order_by("seq").values()),
    )

    with pytest.raises(ThreadBusy) as error:
        begin(thread, "second")

    assert (error.value.status, error.value.code) == (409, "thread_busy")
    after = (
        Thread.objects.filter(pk=thread.pk).values().get(),
        list(Message.objects.filter(thread=thread).order_by("seq").values()),
    )
    assert after == before


def test_the_database_refuses_a_second_run_on_a_thread_whatever_the_application_reads(make_thread, monkeypatch):
    thread = make_thread()
    running = begin(thread, "first").assistant_message
    monkeypatch.setattr(runs.services, "thread_state", lambda **kwargs: ThreadState(running=None, history=[]))

    with pytest.raises(ThreadBusy):
        begin(thread, "second")

    assert list(Message.objects.filter(thread=thread).values_list("seq", "status")) == [
        (1, "complete"),
        (2, "in_progress"),
    ]
    assert fetch(running).status == "in_progress"
    assert Thread.objects.get(pk=thread.pk).last_seq == 2


def test_a_numbering_conflict_is_not_mistaken_for_a_busy_thread(make_thread):
    thread = make_thread()
    begin(thread, "first")
    Message.objects.filter(thread=thread).update(status="complete", lease_expires_at=None)
    Thread.objects.filter(pk=thread.pk).update(last_seq=0)  # as a writer outside the run services could leave it

    with pytest.raises(IntegrityError):
        begin(thread, "second")


def test_run_begin_takes_over_a_lapsed_lease_and_marks_the_dead_runs_answer_interrupted_keeping_its_text(
    make_thread,
):
    thread = make_thread()
    dead = begin(thread, "crashed run").assistant_message
    partial = {"support_advice": "Your bal"}
    assert renew(dead.pk, ('{"support_advice": "Your bal"}', partial))
    lapse(dead)

    start = begin(thread, "next run")

    assert (start.user_message.seq, start.assistant_message.seq) == (3, 4)
    interrupted = fetch(dead)
    assert interrupted.status == "failed"
    assert interrupted.metadata == {"model": "test", "error": INTERRUPTED}
    assert interrupted.metadata["error"]["code"] == "run_interrupted"
    assert (interrupted.content, interrupted.output) == ('{"support_advice": "Your bal"}', partial)
    assert interrupted.lease_expires_at is None
    assert fetch(start.assistant_message).status == "in_progress"


@pytest.mark.django_db(transaction=True)
def test_run_begin_reads_the_history_in_the_transaction_that_takes_the_lease(make_thread, monkeypatch):
    """A run that finished just before is in the next run's history: it is read under the thread's lock."""
    assert not connection.in_atomic_block
    thread = make_thread()
    first = begin(thread, "What is my balance?").assistant_message
    finish(first, model_messages=exchange("What is my balance?", "$1,123.45"))
    reads = []

    def history_spy(**kwargs: Any) -> ThreadState:
        reads.append(connection.in_atomic_block)
        return thread_state(**kwargs)

    monkeypatch.setattr(runs.services, "thread_state", history_spy)

    with CaptureQueriesContext(connection) as captured:
        start = begin(thread, "And now?")

    assert prompts(start.history) == ["What is my balance?"]
    assert reads == [True]
    sql = [query["sql"] for query in captured]
    lock = next(index for index, statement in enumerate(sql) if 'FROM "threads_thread"' in statement)
    history = next(index for index, statement in enumerate(sql) if '"model_messages" AS' in statement)
    assert lock < history, sql
    if connection.vendor == "postgresql":
        assert "FOR UPDATE" in sql[lock]


def test_run_begin_gives_the_last_history_turns_exchanges(make_thread, make_turn):
    thread = make_thread()
    for index in range(3):
        turn(make_turn, thread, f"q{index}")

    start = begin(thread, "next", history_turns=2)

    assert prompts(start.history) == ["q1", "q2"]


# runs_renew


def test_runs_renew_extends_the_lease_and_saves_the_checkpointed_partial_answer(make_thread, frozen_now):
    thread = make_thread()
    message = begin(thread).assistant_message
    frozen_now.advance(10)

    held = renew(message.pk, ('{"support_advice": "Yo"}', {"support_advice": "Yo"}))

    assert held is True
    saved = fetch(message)
    assert (saved.status, saved.content, saved.output) == (
        "in_progress",
        '{"support_advice": "Yo"}',
        {"support_advice": "Yo"},
    )
    assert saved.lease_expires_at == frozen_now.now + timedelta(seconds=LEASE_SECONDS)


def test_runs_renew_without_a_checkpoint_keeps_the_saved_partial_answer(make_thread, frozen_now):
    thread = make_thread(agent_type="general_chat")
    message = begin(thread).assistant_message
    renew(message.pk, ("Once upon", None))
    frozen_now.advance(10)

    assert renew(message.pk) is True

    saved = fetch(message)
    assert (saved.content, saved.output) == ("Once upon", None)
    assert saved.lease_expires_at == frozen_now.now + timedelta(seconds=LEASE_SECONDS)


def test_runs_renew_is_false_once_the_thread_was_deleted_and_writes_nothing(make_thread):
    thread = make_thread()
    message = begin(thread).assistant_message
    thread.delete()

    assert renew(message.pk, ("late", None)) is False
    assert not Message.objects.exists()


def test_runs_renew_is_false_once_the_run_was_interrupted_and_keeps_the_interrupted_answer(make_thread):
    thread = make_thread(agent_type="general_chat")
    message = begin(thread).assistant_message
    renew(message.pk, ("Once upon", None))
    lapse(message)
    runs_interrupt(thread_id=thread.pk)

    assert renew(message.pk, ("Once upon a time", None)) is False

    saved = fetch(message)
    assert (saved.status, saved.content, saved.lease_expires_at) == ("failed", "Once upon", None)


def test_runs_renew_renews_many_runs_in_one_transaction_and_names_the_ones_that_lost_their_lease(make_thread):
    threads = [make_thread(agent_type="general_chat") for _ in range(3)]
    messages = [begin(thread).assistant_message for thread in threads]
    threads[1].delete()

    lost = runs_renew(
        message_ids=[message.pk for message in messages],
        checkpoints={messages[0].pk: ("Once", None), messages[1].pk: ("late", None)},
        lease_seconds=LEASE_SECONDS,
    )

    assert lost == {messages[1].pk}
    assert (fetch(messages[0]).content, fetch(messages[2]).content) == ("Once", "")


# run_finish, run_answer_state


def test_run_finish_fills_the_answer_and_releases_the_lease(make_thread):
    thread = make_thread()
    start = begin(thread, "What is my balance?")
    output = {"support_advice": "Fine.", "block_card": False, "risk_level": 0, "follow_up_actions": []}
    stored = exchange("What is my balance?", "Fine.")

    saved = run_finish(
        message_id=start.assistant_message.pk,
        status=Message.Status.COMPLETE,
        content='{"support_advice": "Fine."}',
        output=output,
        metadata={"model": "demo", "duration_ms": 5, "usage": {"total_tokens": 3}},
        model_messages=stored,
    )

    assert saved is True
    answer = fetch(start.assistant_message)
    assert (answer.status, answer.content, answer.output) == ("complete", '{"support_advice": "Fine."}', output)
    assert answer.metadata == {"model": "demo", "duration_ms": 5, "usage": {"total_tokens": 3}}
    assert answer.model_messages == stored
    assert (answer.seq, answer.role, answer.lease_expires_at) == (2, "assistant", None)
    assert begin(thread, "next").user_message.seq == 3


def test_run_finish_of_a_failed_run_keeps_the_user_message(make_thread):
    thread = make_thread()
    start = begin(thread, "hello")

    finish(start.assistant_message, status="failed", content="", metadata={"error": {"code": "model_error"}})

    assert fetch(start.user_message).content == "hello"
    answer = fetch(start.assistant_message)
    assert (answer.status, answer.model_messages, answer.metadata) == (
        "failed",
        None,
        {"error": {"code": "model_error"}},
    )


def test_run_finish_of_a_run_whose_lease_was_taken_over_changes_nothing_and_leaves_the_new_runs_lease(make_thread):
    thread = make_thread()
    old = begin(thread, "old").assistant_message
    lapse(old)
    new = begin(thread, "new").assistant_message

    assert finish(old, content="late") is False

    assert (fetch(old).status, fetch(old).content) == ("failed", "")
    assert fetch(old).metadata["error"]["code"] == "run_interrupted"
    assert fetch(new).status == "in_progress"
    with pytest.raises(ThreadBusy):
        begin(thread, "third")


def test_run_finish_after_the_thread_was_deleted_is_false_and_writes_nothing(make_thread):
    thread = make_thread()
    message = begin(thread).assistant_message
    thread.delete()

    assert finish(message, content="late") is False
    assert run_answer_state(message_id=message.pk) is None
    assert not Message.objects.exists()


def test_run_answer_state_is_the_saved_status_and_metadata(make_thread):
    message = begin(make_thread()).assistant_message

    assert run_answer_state(message_id=message.pk) == ("in_progress", {"model": "test"})
    finish(message)
    assert run_answer_state(message_id=message.pk) == ("complete", {"model": "test"})


# runs_interrupt


def test_runs_interrupt_marks_lapsed_answers_on_every_thread_and_leaves_live_and_finished_ones(
    make_thread, make_turn, other_user_id
):
    lapsed_here, lapsed_there = begin(make_thread()).assistant_message, begin(make_thread(user=other_user_id))
    lapsed_there = lapsed_there.assistant_message
    live = begin(make_thread()).assistant_message
    finished = make_turn(make_thread())[1]
    renew(lapsed_here.pk, ("Your bal", None))
    lapse(lapsed_here)
    lapse(lapsed_there)
    live_lease = fetch(live).lease_expires_at

    assert runs_interrupt() == 2

    for message in (lapsed_here, lapsed_there):
        interrupted = fetch(message)
        assert (interrupted.status, interrupted.lease_expires_at) == ("failed", None)
        assert interrupted.metadata == {"model": "test", "error": INTERRUPTED}
    assert fetch(lapsed_here).content == "Your bal"
    assert (fetch(live).status, fetch(live).lease_expires_at) == ("in_progress", live_lease)
    assert (fetch(finished).status, fetch(finished).metadata) == ("complete", {})
    assert runs_interrupt() == 0


def test_runs_interrupt_of_one_thread_leaves_the_others(make_thread):
    here, elsewhere = make_thread(), make_thread()
    mine, theirs = begin(here).assistant_message, begin(elsewhere).assistant_message
    lapse(mine)
    lapse(theirs)

    assert runs_interrupt(thread_id=here.pk) == 1

    assert (fetch(mine).status, fetch(theirs).status) == ("failed", "in_progress")


def test_runs_interrupt_does_not_interrupt_a_run_that_renewed_its_lease_after_the_sweep_read_it(
    make_thread, monkeypatch
):
    thread = make_thread()
    message = begin(thread).assistant_message
    lapse(message)
    renewed = []
    interrupt = runs.services._interrupt

    def renewed_once_read(running: Running, now: datetime) -> bool:
        # The run's process renews its lease between the sweep's read and its update.
        renewed.append(renew(running.message_id))
        return interrupt(running, now)

    monkeypatch.setattr(runs.services, "_interrupt", renewed_once_read)
    count = runs_interrupt()

    assert renewed == [True]
    assert count == 0
    saved = fetch(message)
    assert saved.status == "in_progress"
    assert "error" not in saved.metadata


# thread_state


def test_thread_state_history_replays_finished_exchanges_in_order(make_thread, make_turn):
    thread = make_thread()
    for prompt in ["one", "two", "three"]:
        turn(make_turn, thread, prompt)

    history = thread_state(thread_id=thread.pk, turns=10).history

    assert [type(message) for message in history] == [ModelRequest, ModelResponse] * 3
    assert prompts(history) == ["one", "two", "three"]
    assert [part.content for m in history if isinstance(m, ModelResponse) for part in m.parts] == [
        "answer to one",
        "answer to two",
        "answer to three",
    ]


def test_thread_state_history_is_limited_to_the_last_n_turns(make_thread, make_turn):
    thread = make_thread()
    for index in range(5):
        turn(make_turn, thread, f"q{index}")

    assert prompts(thread_state(thread_id=thread.pk, turns=2).history) == ["q3", "q4"]
    assert prompts(thread_state(thread_id=thread.pk, turns=1).history) == ["q4"]


def test_thread_state_history_skips_failed_and_unfinished_exchanges(make_thread, make_turn):
    thread = make_thread()
    turn(make_turn, thread, "kept")
    turn(make_turn, thread, "model failed", status="failed", store_messages=False)
    turn(make_turn, thread, "also kept")
    running = begin(thread, "still running").assistant_message
    renew(running.pk, ("partial", None))

    assert prompts(thread_state(thread_id=thread.pk, turns=10).history) == ["kept", "also kept"]


def test_thread_state_history_skips_failed_and_incomplete_answers_despite_stored_model_messages(make_thread, make_turn):
    thread = make_thread()
    turn(make_turn, thread, "kept")
    turn(make_turn, thread, "cancelled", status="incomplete")
    turn(make_turn, thread, "failed", status="failed")
    turn(make_turn, thread, "also kept")

    assert prompts(thread_state(thread_id=thread.pk, turns=10).history) == ["kept", "also kept"]


def test_thread_state_history_counts_turns_among_finished_exchanges_only(make_thread, make_turn):
    thread = make_thread()
    turn(make_turn, thread, "first")
    turn(make_turn, thread, "second")
    turn(make_turn, thread, "failed", status="failed", store_messages=False)
    interrupted = begin(thread, "interrupted").assistant_message
    lapse(interrupted)
    runs_interrupt()

    assert prompts(thread_state(thread_id=thread.pk, turns=2).history) == ["first", "second"]


def test_thread_state_history_replays_tool_calls_and_returns(make_thread, make_turn):
    thread = make_thread()
    run = [
        ModelRequest(parts=[UserPromptPart(content="What is my balance?")]),
        ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": False}, tool_call_id="c1")]),
        ModelRequest(parts=[ToolReturnPart("customer_balance", 1123.45, tool_call_id="c1")]),
        ModelResponse(parts=[TextPart(content="Your balance is $1,123.45.")]),
    ]
    make_turn(thread, query="What is my balance?", model_messages=to_jsonable_python(run))

    history = thread_state(thread_id=thread.pk, turns=5).history

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


def test_thread_state_history_of_another_thread_is_not_mixed_in(make_thread, make_turn):
    thread, other = make_thread(), make_thread()
    turn(make_turn, other, "elsewhere")
    turn(make_turn, thread, "here")

    assert prompts(thread_state(thread_id=thread.pk, turns=10).history) == ["here"]
    assert thread_state(thread_id=make_thread().pk, turns=10).history == []
