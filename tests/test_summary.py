"""A thread's running summary (runs.summaries, agents.summary): the exchanges that leave the model's history window
are folded, in the background after each answer, into a summary the model is shown ahead of the recent ones.

Where a test waits for a summary it awaits `runs.summaries.settled()`; a summariser the test holds waits on an event
the test sets.
"""

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_core import to_jsonable_python

from agents import demo_script
from agents.checks import check_summary_model
from agents.summary import SUMMARY_PREFIX, Exchange, summary_prompt
from identity.models import APIKey
from runs import runner, summaries
from runs.lease import Turn, question
from runs.pipeline import stream_answer
from runs.runner import run_blocking, start_run
from runs.summaries import summary_update
from tests.asgi import http_call
from threads.models import Message, Thread

TIMEOUT = 20.0
"""Upper bound, in seconds, of any one step: a hang fails the test instead of the whole run."""


def fold(previous: str, *exchanges: tuple[str, str]) -> str:
    """What the summariser is asked: the summary so far, then the exchanges that came after it."""
    blocks = [f"<summary>\n{previous}\n</summary>"]
    blocks += [f"<user>\n{question}\n</user>\n<assistant>\n{answer}\n</assistant>" for question, answer in exchanges]
    return "\n".join(blocks)


class Summariser:
    """A summarising model recording what it is asked; it answers "summary 1", "summary 2", … in turn."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def respond(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.prompts += [p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart)]
        return ModelResponse(parts=[TextPart(f"summary {len(self.prompts)}")])

    def model(self) -> FunctionModel:
        return FunctionModel(self.respond, model_name="summariser")


def exchange(thread: Thread, number: int, make_turn) -> tuple[str, str]:
    question, answer = f"question {number}", f"answer {number}"
    make_turn(thread, query=question, answer=answer, model_messages=[])
    return question, answer


def summarise_now(thread: Thread) -> bool:
    return async_to_sync(summary_update)(thread.pk)


# --- incremental --------------------------------------------------------------------------------------------------


def test_the_summariser_is_given_the_summary_so_far_and_only_the_exchanges_that_left_the_window_since(
    make_thread, make_turn, settings
):
    settings.AGENT_HISTORY_TURNS = 2
    summariser = Summariser()
    settings.AGENT_SUMMARY_MODEL = summariser.model()
    thread = make_thread(agent_type="general_chat")
    first, second, third = (exchange(thread, number, make_turn) for number in (1, 2, 3))

    summarise_now(thread)

    assert summariser.prompts == [fold("", first)]
    thread.refresh_from_db()
    assert (thread.summary, thread.summary_upto_seq, thread.summary_exchanges) == ("summary 1", 2, 1)
    assert thread.summary_updated_at is not None

    exchange(thread, 4, make_turn), exchange(thread, 5, make_turn)
    summarise_now(thread)

    assert summariser.prompts[1:] == [fold("summary 1", second, third)]
    thread.refresh_from_db()
    assert (thread.summary, thread.summary_upto_seq, thread.summary_exchanges) == ("summary 2", 6, 3)

    summarise_now(thread)  # nothing left the window since: the model is not asked

    assert len(summariser.prompts) == 2


def test_a_failed_answer_is_no_exchange_of_the_summary_nor_of_the_window(make_thread, make_turn, settings):
    settings.AGENT_HISTORY_TURNS = 1
    summariser = Summariser()
    settings.AGENT_SUMMARY_MODEL = summariser.model()
    thread = make_thread(agent_type="general_chat")
    first = exchange(thread, 1, make_turn)
    make_turn(thread, query="never answered", status=Message.Status.FAILED)
    exchange(thread, 2, make_turn)

    summarise_now(thread)

    assert summariser.prompts == [fold("", first)]


def test_a_thread_far_behind_catches_up_a_batch_at_a_time(make_thread, make_turn, settings, monkeypatch):
    monkeypatch.setattr(summaries, "SUMMARY_BATCH", 2)
    settings.AGENT_HISTORY_TURNS = 1
    summariser = Summariser()
    settings.AGENT_SUMMARY_MODEL = summariser.model()
    thread = make_thread(agent_type="general_chat")
    said = [exchange(thread, number, make_turn) for number in range(1, 7)]

    assert summarise_now(thread) is True  # more to fold in
    assert summarise_now(thread) is True
    assert summarise_now(thread) is False

    assert summariser.prompts == [fold("", *said[0:2]), fold("summary 1", *said[2:4]), fold("summary 2", said[4])]
    thread.refresh_from_db()
    assert thread.summary_exchanges == 5


# --- the demo model's summary ----------------------------------------------------------------------------------------


def test_the_demo_model_keeps_what_the_user_said_of_themselves_and_amounts():
    written = demo_script.summary(
        summary_prompt(
            "",
            [
                Exchange("Hi, my name is Ada. I live in Lisbon. What is my balance?", "Ada, your balance is $12.00."),
                Exchange("Tell me a poem", "Digits dance across the ledger's face"),
                Exchange("I sent $250 to Bob yesterday", "Noted."),
            ],
        )
    )

    assert written == (
        "The user said earlier:\n- Hi, my name is Ada.\n- I live in Lisbon.\n- I sent $250 to Bob yesterday."
    )
    # Folded into again: what it held, then what came after; a name given again is the one asked for.
    again = demo_script.summary(summary_prompt(written, [Exchange("Actually my name is Bea.", "Hello Bea!")]))
    assert again.splitlines()[1:] == [*written.splitlines()[1:], "- Actually my name is Bea."]
    context = demo_script.Context(prompt="What is my name?", earlier_prompts=[], instructions="", summary=again)
    assert demo_script.chat_answer(context) == "Your name is Bea."


def test_the_demo_model_keeps_the_name_longest(monkeypatch):
    monkeypatch.setattr(demo_script, "FACTS_KEPT", 2)
    said = [Exchange(f"I paid ${number} for lunch.", "Noted.") for number in range(3)]

    written = demo_script.summary(summary_prompt("", [Exchange("My name is Ada.", "Hi Ada!"), *said]))

    assert written.splitlines()[1:] == ["- My name is Ada.", "- I paid $2 for lunch."]


def test_the_demo_model_says_so_when_nothing_needs_remembering():
    written = demo_script.summary(summary_prompt("", [Exchange("Tell me a poem", "Digits dance")]))

    assert written == "Nothing the user said earlier needs remembering."


@pytest.mark.parametrize(("name", "problems"), [("", []), ("demo", []), ("openai:gpt-4o-mini", []), ("gpt", ["E003"])])
def test_a_summary_model_that_names_no_model_fails_the_checks(settings, name, problems):
    settings.AGENT_SUMMARY_MODEL = name

    assert [error.id.split(".")[1] for error in check_summary_model(None)] == problems


# --- the admin ------------------------------------------------------------------------------------------------------


def test_the_threads_admin_page_shows_its_summary(admin_client, make_thread):
    thread = make_thread(title="Long conversation")
    Thread.objects.filter(pk=thread.pk).update(summary="The user said earlier: my name is Ada.", summary_exchanges=4)

    response = admin_client.get(f"/admin/threads/thread/{thread.pk}/change/")

    assert response.status_code == 200
    assert "The user said earlier: my name is Ada." in response.content.decode()


# --- shown to the model, never saved ------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [runner._answer_whole, stream_answer], ids=["blocking", "streamed"])
def test_the_model_sees_the_summary_ahead_of_the_history_and_the_saved_messages_are_what_was_said(
    make_thread, make_turn, settings, demo_customer, step
):
    requests: list[list[ModelMessage]] = []

    def balance_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        requests.append(messages)
        if len(requests) == 1:
            return ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": False})])
        advice = {"support_advice": "ok", "block_card": False, "risk_level": 0, "follow_up_actions": []}
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, advice)])

    async def streamed(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[DeltaToolCalls]:
        (call,) = balance_then_answer(messages, info).parts
        assert isinstance(call, ToolCallPart)
        yield {0: DeltaToolCall(name=call.tool_name, json_args=call.args_as_json_str(), tool_call_id=call.tool_call_id)}

    settings.AGENT_MODEL = FunctionModel(balance_then_answer, stream_function=streamed)
    thread = make_thread()
    earlier = [ModelRequest(parts=[UserPromptPart("I live in Lisbon.")]), ModelResponse(parts=[TextPart("Noted.")])]
    make_turn(thread, query="I live in Lisbon.", answer="Noted.", model_messages=to_jsonable_python(earlier))
    Thread.objects.filter(pk=thread.pk).update(summary="The user's name is Ada.", summary_exchanges=3)

    async def answer() -> Turn:
        take = question(user_id=thread.user_id, thread_id=thread.pk, query="What is my balance?")
        started = await start_run(thread_id=thread.pk, take=take, answer=step, awaited=True)
        assert started is not None and await started.finished is None
        return started.turn

    turn = async_to_sync(answer)()

    # Every request of the run (the one after the tool call too): the summary, then the history, then the question.
    assert len(requests) == 2
    for messages in requests:
        parts = [part for message in messages if isinstance(message, ModelRequest) for part in message.parts]
        assert isinstance(parts[0], SystemPromptPart)
        assert parts[0].content == SUMMARY_PREFIX + "The user's name is Ada."
        prompts = [part.content for part in parts if isinstance(part, UserPromptPart)]
        assert prompts == ["I live in Lisbon.", "What is my balance?"]
    saved = Message.objects.get(pk=turn.assistant_message.pk)
    assert saved.status == "complete"
    kinds = [[part["part_kind"] for part in message["parts"]] for message in saved.model_messages]
    assert kinds == [["user-prompt"], ["tool-call"], ["tool-return"], ["tool-call"], ["tool-return"]]
    assert saved.model_messages[0]["parts"][0]["content"] == "What is my balance?"
    assert SUMMARY_PREFIX not in json.dumps(saved.model_messages)


def test_without_a_summary_the_model_sees_the_history_alone(make_thread, use_model):
    requests: list[list[ModelMessage]] = []
    use_model(lambda messages, info: requests.append(messages) or ModelResponse(parts=[TextPart("Hello")]))
    thread = make_thread(agent_type="general_chat")

    async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query="Hi")

    parts = [part for message in requests[0] for part in message.parts]
    assert not [part for part in parts if isinstance(part, SystemPromptPart)]


# --- two writers at once ------------------------------------------------------------------------------------------


def test_of_two_summaries_written_at_once_from_the_same_one_only_the_first_is_kept(
    make_thread, make_turn, settings, caplog
):
    settings.AGENT_HISTORY_TURNS = 1
    asked: list[str] = []
    both_asked = asyncio.Event()
    first_saved = asyncio.Event()

    async def held(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked.append("asked")
        writer = len(asked)
        if writer == 2:
            both_asked.set()
            await first_saved.wait()  # the second finishes after the first has written
        await both_asked.wait()
        return ModelResponse(parts=[TextPart(f"written by {writer}")])

    settings.AGENT_SUMMARY_MODEL = FunctionModel(held)
    thread = make_thread(agent_type="general_chat")
    for number in (1, 2, 3):
        exchange(thread, number, make_turn)

    async def two_at_once() -> None:
        first = asyncio.create_task(summary_update(thread.pk))
        second = asyncio.create_task(summary_update(thread.pk))
        await first
        first_saved.set()
        await second

    with caplog.at_level(logging.INFO, logger="runs.summaries"):
        async_to_sync(two_at_once)()

    assert len(asked) == 2  # both read the same summary, and wrote theirs
    thread.refresh_from_db()
    assert (thread.summary, thread.summary_exchanges, thread.summary_upto_seq) == ("written by 1", 2, 4)
    assert "dropped" in caplog.text


# --- in the background, through the runs ----------------------------------------------------------------------------


@pytest.fixture
def transactional(settings, transactional_db):
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    settings.RUN_LEASE_SECONDS = settings.RUN_CHECKPOINT_SECONDS = 3600


async def everything_settled() -> None:
    """Every run ended (its last events handed on) and every summary written or given up."""
    async with asyncio.timeout(TIMEOUT):
        while runner._RUNS:
            await asyncio.wait(set(runner._RUNS))
        await summaries.settled()


@sync_to_async
def stored(thread_id: uuid.UUID) -> Thread:
    return Thread.objects.get(pk=thread_id)


@sync_to_async
def chat_thread(user_id: uuid.UUID) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="general_chat")


async def ask(thread: Thread, query: str) -> Message:
    turn = await run_blocking(user_id=thread.user_id, thread_id=thread.pk, query=query)
    return turn.assistant_message


async def test_a_summary_being_written_holds_up_no_question(transactional, settings, user_id):
    settings.AGENT_HISTORY_TURNS = 1
    asked: list[str] = []
    called, release = asyncio.Event(), asyncio.Event()

    async def slow(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked.extend(p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart))
        called.set()
        await release.wait()
        return ModelResponse(parts=[TextPart(f"summary {len(asked)}")])

    settings.AGENT_SUMMARY_MODEL = FunctionModel(slow)
    thread = await chat_thread(user_id)
    await ask(thread, "Hello")
    await ask(thread, "my name is Ada")  # "Hello" left the window: its summary is being written
    async with asyncio.timeout(TIMEOUT):
        await called.wait()

    answer = await ask(thread, "Tell me a poem")  # answered while the summariser still writes

    assert answer.status == "complete"
    assert len(asked) == 1
    release.set()
    await everything_settled()
    # The summary written from "Hello" went on with what left the window meanwhile, one exchange at a time.
    assert len(asked) == 2
    assert "<user>\nmy name is Ada\n</user>" in asked[1] and "Hello" not in asked[1]
    saved = await stored(thread.pk)
    assert (saved.summary, saved.summary_exchanges) == ("summary 2", 2)


async def test_a_failing_summariser_keeps_the_old_summary_and_the_next_answer_tries_again(
    transactional, settings, user_id, caplog
):
    settings.AGENT_HISTORY_TURNS = 1

    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(status_code=500, model_name="summariser", body="provider exploded")

    summariser = Summariser()
    thread = await chat_thread(user_id)
    settings.AGENT_SUMMARY_MODEL = summariser.model()
    await ask(thread, "my name is Ada")
    await ask(thread, "Hello")
    await everything_settled()
    assert (await stored(thread.pk)).summary == "summary 1"

    settings.AGENT_SUMMARY_MODEL = FunctionModel(broken)
    with caplog.at_level(logging.WARNING, logger="runs.summaries"):
        answer = await ask(thread, "Tell me a poem")
        await everything_settled()

    assert answer.status == "complete"
    saved = await stored(thread.pk)
    assert (saved.summary, saved.summary_exchanges, saved.summary_upto_seq) == ("summary 1", 1, 2)
    assert "left as it was (model_error)" in caplog.text
    assert "provider exploded" not in caplog.text

    settings.AGENT_SUMMARY_MODEL = summariser.model()
    await ask(thread, "Thanks")
    await everything_settled()

    saved = await stored(thread.pk)
    assert (saved.summary, saved.summary_exchanges) == ("summary 2", 3)
    retried = summariser.prompts[1]  # the exchanges that left the window since the summary, the failed try's too
    assert retried.startswith("<summary>\nsummary 1\n</summary>\n<user>\nHello\n</user>")
    assert "<user>\nTell me a poem\n</user>" in retried and "my name is Ada" not in retried


# --- end to end: the name given first, asked 25 exchanges later ----------------------------------------------------


class Client:
    """Blocking queries and reads through the ASGI application, in the test's event loop: a run's background work
    (its summary) lives on after the request, as on a server."""

    def __init__(self, key: str, user_id: uuid.UUID) -> None:
        self.key, self.user_id = key, user_id

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        reply = await http_call(method, path, {"x-api-key": self.key, "x-user-id": str(self.user_id)}, body)
        return reply.status, reply.json()

    async def ask(self, thread_id: str, query: str) -> str:
        status, body = await self.request("POST", "/api/v1/agent/query", {"thread_id": thread_id, "query": query})
        assert status == 200, body
        return body["response"]


@pytest.fixture
def key(transactional_db) -> str:
    return APIKey.objects.create_key(name="summary tests")[1]


@pytest.mark.parametrize("turns", [3, None], ids=["3 turns", "the default window"])
async def test_the_name_given_first_is_remembered_25_exchanges_later(transactional, settings, key, turns):
    if turns is None:
        assert settings.AGENT_HISTORY_TURNS == 20
    else:
        settings.AGENT_HISTORY_TURNS = turns
    window = settings.AGENT_HISTORY_TURNS
    client = Client(key, uuid.uuid4())
    status, thread = await client.request("POST", "/api/v1/threads", {"agent_type": "general_chat"})
    assert status == 201

    assert await client.ask(thread["id"], "Hi, my name is Ada.") == "Nice to meet you, Ada! How can I help you today?"
    await everything_settled()
    for number in range(25):
        await client.ask(thread["id"], f"Tell me about topic {number}")
        await everything_settled()

    status, detail = await client.request("GET", f"/api/v1/threads/{thread['id']}")
    assert status == 200
    assert detail["summary"]["exchanges"] == 26 - window  # the first among them: the model no longer sees it whole
    assert datetime.fromisoformat(detail["summary"]["updated_at"]) <= datetime.now(UTC)
    assert await client.ask(thread["id"], "What is my name?") == "Your name is Ada."
    await everything_settled()
