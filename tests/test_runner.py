"""The blocking run (runs.runner.run_blocking): the model through the real agents, tools and database, the
answer saved, its events broadcast, its lease kept, and what happens when it is cancelled, abandoned or stopped."""

import asyncio
import inspect
import json
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from types import SimpleNamespace

import pytest
from asgiref.sync import async_to_sync
from django.db import DatabaseError, transaction
from django.utils import timezone
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

import runs.keeper
import runs.lease
import runs.runner
from bankagent.db import db
from bankagent.exceptions import ApplicationError, ModelError, ModelNotConfigured, RunInterrupted
from runs.broadcast import Broadcast
from runs.hub import LocalRun, hub
from runs.lease import Turn, question, until_stopped
from runs.limits import slots
from runs.pipeline import stream_answer
from runs.runner import run_blocking, start_run
from runs.selectors import thread_state
from runs.services import RunStart, runs_interrupt
from tests.conftest import saves_then_drops_the_connection
from threads.models import Message, Thread

ADVICE = {"support_advice": "Your balance is $1,123.45.", "block_card": False, "risk_level": 1, "follow_up_actions": []}


def balance_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First call the balance tool, then answer with what it returned."""
    last = messages[-1]
    returns = [p for p in last.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": True})])
    advice = {**ADVICE, "support_advice": f"Your balance is {returns[0].content}."}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, advice)])


def run(thread: Thread, query: str) -> Turn:
    return async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query=query)


@pytest.fixture
def broadcast_events(monkeypatch) -> list[dict]:
    """Every event the runs broadcast to their thread's readers, in order."""
    events: list[dict] = []

    class Recording(Broadcast):
        def emit(self, event: dict) -> None:
            events.append(event)
            super().emit(event)

    monkeypatch.setattr(runs.runner, "Broadcast", Recording)
    return events


@pytest.fixture
def free_slots():
    """The run slots taken before the test; every run must give its slot back."""
    taken = slots.taken
    yield
    assert slots.taken == taken


def test_tool_call_then_structured_output_is_saved(make_thread, use_model, free_slots):
    use_model(balance_then_answer)
    thread = make_thread()

    turn = run(thread, "What is my balance?")

    answer = Message.objects.get(pk=turn.assistant_message.pk)
    # John's balance plus his pending card payment, read from the database by the real tool.
    assert answer.output["support_advice"] == "Your balance is 1118.95."
    assert json.loads(answer.content) == answer.output
    assert (answer.status, answer.lease_expires_at) == (Message.Status.COMPLETE, None)
    assert answer.metadata["usage"]["requests"] == 2
    assert answer.metadata["usage"]["tool_calls"] == 1
    assert answer.metadata["model"] == "function:balance_then_answer:"
    assert answer.metadata["duration_ms"] >= 0
    kinds = [part["part_kind"] for message in answer.model_messages for part in message["parts"]]
    assert kinds[:1] == ["user-prompt"]
    assert "tool-call" in kinds and "tool-return" in kinds
    assert (turn.assistant_message.status, turn.assistant_message.content) == ("complete", answer.content)


def test_history_replays_tool_calls_across_turns(make_thread, use_model):
    seen: list[list[ModelMessage]] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(messages)
        return balance_then_answer(messages, info)

    use_model(recording)
    thread = make_thread()
    run(thread, "What is my balance?")
    run(thread, "And now?")

    second_turn_first_request = seen[2]
    prompts = [p.content for m in second_turn_first_request for p in m.parts if isinstance(p, UserPromptPart)]
    assert prompts == ["What is my balance?", "And now?"]
    calls = [p for m in second_turn_first_request for p in m.parts if isinstance(p, ToolCallPart)]
    returns = [p for m in second_turn_first_request for p in m.parts if isinstance(p, ToolReturnPart)]
    assert calls[0].tool_name == "customer_balance" and calls[0].args_as_dict() == {"include_pending": True}
    assert returns[0].tool_name == "customer_balance" and returns[0].content == 1118.95
    assert returns[0].tool_call_id == calls[0].tool_call_id


def test_history_window_keeps_the_latest_turns(make_thread, use_model, settings):
    seen: list[list[ModelMessage]] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(messages)
        return ModelResponse(parts=[TextPart("ok")])

    use_model(recording)
    settings.AGENT_HISTORY_TURNS = 2
    thread = make_thread(agent_type="general_chat")
    for number in range(4):
        run(thread, f"question {number}")

    prompts = [p.content for m in seen[-1] for p in m.parts if isinstance(p, UserPromptPart)]
    assert prompts == ["question 1", "question 2", "question 3"]


def test_text_agent_stores_text_and_no_output(make_thread, use_model):
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("Hello there")]))
    turn = run(make_thread(agent_type="general_chat"), "Hi")
    answer = Message.objects.get(pk=turn.assistant_message.pk)
    assert (answer.content, answer.output, answer.status) == ("Hello there", None, "complete")


def test_model_error_keeps_the_question_and_records_a_failed_answer(make_thread, use_model, free_slots):
    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(status_code=500, model_name="broken", body="provider exploded")

    use_model(broken)
    thread = make_thread()

    with pytest.raises(ModelError):
        run(thread, "What is my balance?")

    question, answer = Message.objects.filter(thread=thread).order_by("seq")
    assert (question.role, question.content, question.status) == ("user", "What is my balance?", "complete")
    assert (answer.role, answer.status, answer.model_messages, answer.lease_expires_at) == (
        "assistant",
        "failed",
        None,
        None,
    )
    assert answer.metadata["error"]["code"] == "model_error"
    assert "provider exploded" not in json.dumps(answer.metadata)
    assert thread_state(thread_id=thread.pk, turns=10).history == []


def test_missing_provider_key_is_503_and_writes_nothing(make_thread, settings, monkeypatch, free_slots):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings.AGENT_MODEL = "openai:gpt-4o"
    thread = make_thread()

    with pytest.raises(ModelNotConfigured) as raised:
        run(thread, "Hello")

    assert raised.value.status == 503
    assert not Message.objects.filter(thread=thread).exists()


def test_request_to_a_real_provider_is_refused_in_tests(make_thread, settings, monkeypatch):
    """ALLOW_MODEL_REQUESTS is off: a test can never reach a paid provider by accident."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    settings.AGENT_MODEL = "openai:gpt-4o-mini"
    thread = make_thread()

    with pytest.raises(Exception) as raised:
        run(thread, "Hello")

    assert raised.value.status == 500
    assert "sk-test" not in str(raised.value)
    assert Message.objects.get(thread=thread, role="assistant").status == "failed"


def test_first_request_of_a_turn_carries_the_customer_name(make_thread, use_model):
    seen: list[AgentInfo] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(info)
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, ADVICE)])

    use_model(recording)
    run(make_thread(), "Hello")
    assert "The customer's name is 'John'" in seen[0].instructions


# Events


def test_blocking_run_broadcasts_created_started_complete_then_done(make_thread, use_model, broadcast_events):
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("Hello there")]))
    thread = make_thread(agent_type="general_chat")

    turn = run(thread, "Hi")

    assert [event["event"] for event in broadcast_events] == [
        "message_created",
        "message_started",
        "message_complete",
        "done",
    ]
    created, started, complete, _ = broadcast_events
    assert created["message"] == {"id": str(turn.user_message.pk), "role": "user", "content": "Hi"}
    assert started["message_id"] == str(turn.assistant_message.pk)
    assert complete == {
        "event": "message_complete",
        "message_id": str(turn.assistant_message.pk),
        "status": "complete",
        "content": "Hello there",
        "output": None,
    }


def test_failed_blocking_run_broadcasts_error_then_done(make_thread, use_model, broadcast_events):
    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(status_code=500, model_name="broken", body="provider exploded")

    use_model(broken)
    thread = make_thread()

    with pytest.raises(ModelError):
        run(thread, "Hello")

    assert [event["event"] for event in broadcast_events] == ["message_created", "message_started", "error", "done"]
    error = broadcast_events[2]
    assert (error["error_type"], error["message_id"]) == (
        "model_error",
        str(Message.objects.get(thread=thread, role="assistant").pk),
    )
    assert "provider exploded" not in json.dumps(broadcast_events)


def test_blocking_run_whose_answer_cannot_be_saved_broadcasts_error_then_done(
    make_thread, use_model, broadcast_events, monkeypatch, free_slots
):
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("Hello there")]))

    def broken_finish(**kwargs: object) -> bool:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(runs.lease, "run_finish", broken_finish)

    with pytest.raises(ApplicationError) as raised:
        run(make_thread(agent_type="general_chat"), "Hi")

    assert raised.value.code == "internal_error"
    assert [event["event"] for event in broadcast_events] == ["message_created", "message_started", "error", "done"]
    assert broadcast_events[2]["error_type"] == "internal_error"


# Cancelled, abandoned, stopped


def test_cancelled_blocking_run_saves_an_incomplete_answer_and_returns_it(
    make_thread, use_model, broadcast_events, free_slots
):
    thread = make_thread(agent_type="general_chat")

    async def cancelled_while_answering(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await hub().cancel(thread.pk)  # as a reader of the thread would, through the hub
        await asyncio.Event().wait()  # the model answers only when stopped
        raise AssertionError("the run was not stopped")

    use_model(cancelled_while_answering)

    turn = run(thread, "Tell me a long story")

    answer = Message.objects.get(pk=turn.assistant_message.pk)
    assert (answer.status, answer.content, answer.lease_expires_at) == ("incomplete", "", None)
    assert answer.metadata["cancelled"] is True
    assert turn.assistant_message.status == "incomplete"
    assert [event["event"] for event in broadcast_events][-2:] == ["message_complete", "done"]
    assert broadcast_events[-2]["status"] == "incomplete"
    assert thread_state(thread_id=thread.pk, turns=10).history == []


def test_blocking_run_goes_on_and_saves_its_answer_when_its_caller_goes_away(make_thread, use_model, free_slots):
    thread = make_thread(agent_type="general_chat")
    model_started, model_may_answer = [], []

    async def slow(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        model_started[0].set()
        await model_may_answer[0].wait()
        return ModelResponse(parts=[TextPart("Still answered")])

    use_model(slow)

    async def caller_goes_away() -> None:
        model_started.append(asyncio.Event())
        model_may_answer.append(asyncio.Event())
        caller = asyncio.create_task(run_blocking(user_id=thread.user_id, thread_id=thread.pk, query="Hi"))
        await model_started[0].wait()
        the_run = next(task for task in asyncio.all_tasks() if task.get_coro().__name__ == "_open_and_execute")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        model_may_answer[0].set()
        async with asyncio.timeout(30):
            await the_run

    async_to_sync(caller_goes_away)()

    answer = Message.objects.get(thread=thread, role="assistant")
    assert (answer.status, answer.content) == ("complete", "Still answered")


def test_blocking_run_answers_when_its_caller_goes_away_while_the_lease_is_being_taken(
    make_thread, use_model, monkeypatch, free_slots
):
    thread = make_thread(agent_type="general_chat")
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("Answered all the same")]))
    taking, may_take = [], threading.Event()
    real_begin = runs.lease.run_begin

    def begin_once_allowed(**kwargs: object) -> RunStart:
        loop, event = taking[0]
        loop.call_soon_threadsafe(event.set)
        may_take.wait(timeout=30)
        return real_begin(**kwargs)

    monkeypatch.setattr(runs.lease, "run_begin", begin_once_allowed)

    async def caller_goes_away() -> None:
        taking.append((asyncio.get_running_loop(), asyncio.Event()))
        caller = asyncio.create_task(run_blocking(user_id=thread.user_id, thread_id=thread.pk, query="Hi"))
        await taking[0][1].wait()
        the_run = next(task for task in asyncio.all_tasks() if task.get_coro().__name__ == "_open_and_execute")
        caller.cancel()
        may_take.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(30):
            await the_run

    async_to_sync(caller_goes_away)()

    answer = Message.objects.get(thread=thread, role="assistant")
    assert (answer.status, answer.content, answer.lease_expires_at) == ("complete", "Answered all the same", None)


# The keeper writes on a connection of its own: it must see what the test committed.
@pytest.mark.django_db(transaction=True)
def test_blocking_run_whose_lease_is_lost_is_stopped_and_raises_run_interrupted(
    make_thread, use_model, settings, monkeypatch, free_slots
):
    settings.RUN_LEASE_SECONDS = 0.03  # renewed every 10 ms: the loss is noticed at once
    monkeypatch.setattr(runs.runner, "ensure_sweeper", lambda go_on: None)  # the sweep has tests of its own
    thread = make_thread(agent_type="general_chat")

    @transaction.atomic  # the keeper renews on a connection of its own: not between these two
    def interrupt_this_run() -> None:
        # As the sweep does once the run's lease has lapsed (its process looked dead).
        lapsed = timezone.now() - timedelta(seconds=1)
        Message.objects.filter(thread=thread, status="in_progress").update(lease_expires_at=lapsed)
        runs_interrupt(thread_id=thread.pk)

    async def interrupted_while_answering(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await db(interrupt_this_run)()
        await asyncio.Event().wait()  # the model answers only when stopped
        raise AssertionError("the run was not stopped")

    use_model(interrupted_while_answering)

    async def scenario() -> Turn:
        async with asyncio.timeout(30):
            return await run_blocking(user_id=thread.user_id, thread_id=thread.pk, query="Hi")

    with pytest.raises(RunInterrupted) as raised:
        async_to_sync(scenario)()

    assert (raised.value.status, raised.value.code) == (503, "run_interrupted")
    answer = Message.objects.get(thread=thread, role="assistant")
    assert (answer.status, answer.metadata["error"]["code"]) == ("failed", "run_interrupted")


# The keeper writes on a connection of its own: it must see what the test committed.
@pytest.mark.django_db(transaction=True)
def test_lease_renewal_retries_after_a_database_error(make_thread, use_model, settings, monkeypatch, free_slots):
    settings.RUN_LEASE_SECONDS = 0.03  # renewed every 10 ms
    monkeypatch.setattr(runs.runner, "ensure_sweeper", lambda go_on: None)  # the sweep has tests of its own
    thread = make_thread(agent_type="general_chat")
    renewals: list[str] = []
    renewed = []
    real_renew = runs.keeper.runs_renew

    def flaky_renew(**kwargs: object) -> set:
        if not renewals:
            renewals.append("failed")
            raise DatabaseError("connection reset")
        renewals.append("renewed")
        lost = real_renew(**kwargs)
        renewed[0][0].call_soon_threadsafe(renewed[0][1].set)
        return lost

    monkeypatch.setattr(runs.keeper, "runs_renew", flaky_renew)

    async def answer_once_renewed(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await renewed[0][1].wait()
        return ModelResponse(parts=[TextPart("Kept")])

    use_model(answer_once_renewed)

    async def scenario() -> Turn:
        renewed.append((asyncio.get_running_loop(), asyncio.Event()))
        async with asyncio.timeout(30):
            return await run_blocking(user_id=thread.user_id, thread_id=thread.pk, query="Hi")

    turn = async_to_sync(scenario)()

    assert renewals[:2] == ["failed", "renewed"]
    assert Message.objects.get(pk=turn.assistant_message.pk).status == "complete"


def test_run_stopped_before_its_model_turn_never_starts_the_model():
    local = LocalRun(thread_id=uuid.uuid4(), received_at=0.0)
    local.stop("cancelled")
    started = []

    async def model_call() -> str:
        started.append(True)
        return "never"

    call = model_call()

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await until_stopped(SimpleNamespace(local=local), call)

    async_to_sync(scenario)()

    assert started == []
    assert inspect.getcoroutinestate(call) == inspect.CORO_CLOSED  # closed, not left to warn "never awaited"


# One lifecycle, blocking or streamed


@pytest.mark.parametrize("answer", [runs.runner._answer_whole, stream_answer], ids=["blocking", "streamed"])
def test_a_run_stopped_by_the_servers_shutdown_ends_with_run_interrupted_then_done(
    make_thread, settings, broadcast_events, free_slots, answer
):
    async def never_answers(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def never_streams(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield "unreachable"

    settings.AGENT_MODEL = FunctionModel(never_answers, stream_function=never_streams)
    thread = make_thread(agent_type="general_chat")

    async def shut_down_mid_answer() -> None:
        take = question(user_id=thread.user_id, thread_id=thread.pk, query="Hi")
        started = await start_run(thread_id=thread.pk, take=take, answer=answer, awaited=True)
        (the_run,) = runs.runner._RUNS
        while not any(event["event"] == "message_started" for event in broadcast_events):
            await asyncio.sleep(0)
        the_run.cancel()  # as the event loop's end cancels every task left
        with pytest.raises(asyncio.CancelledError):
            await the_run
        with pytest.raises(RunInterrupted):
            await started.finished

    async_to_sync(shut_down_mid_answer)()

    names = [event["event"] for event in broadcast_events]
    assert names == ["message_created", "message_started", "error", "done"]
    assert broadcast_events[2]["error_type"] == "run_interrupted"
    # Left to be marked interrupted once its lease lapses, as when the process dies.
    assert Message.objects.get(thread=thread, role="assistant").status == "in_progress"


@pytest.mark.parametrize("answer", [runs.runner._answer_whole, stream_answer], ids=["blocking", "streamed"])
def test_an_answer_saved_before_its_connection_failed_is_the_answer_not_an_interruption(
    make_thread, settings, broadcast_events, monkeypatch, free_slots, answer
):
    async def saved_once(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "Saved once"

    settings.AGENT_MODEL = FunctionModel(
        lambda messages, info: ModelResponse(parts=[TextPart("Saved once")]), stream_function=saved_once
    )
    attempts = saves_then_drops_the_connection(monkeypatch)
    thread = make_thread(agent_type="general_chat")

    async def ask() -> ApplicationError | None:
        take = question(user_id=thread.user_id, thread_id=thread.pk, query="Hi")
        started = await start_run(thread_id=thread.pk, take=take, answer=answer, awaited=True)
        return await started.finished

    assert async_to_sync(ask)() is None

    assert attempts == [True, False]  # the retry found the answer saved
    names = [event["event"] for event in broadcast_events]
    assert names[:2] == ["message_created", "message_started"] and names[-2:] == ["message_complete", "done"]
    assert "error" not in names
    assert list(Message.objects.filter(thread=thread).values_list("role", "status", "content")) == [
        ("user", "complete", "Hi"),
        ("assistant", "complete", "Saved once"),
    ]
