"""Bounded spending: a run stops with `usage_limit_reached` at AGENT_MAX_REQUESTS, AGENT_MAX_TOOL_CALLS or
AGENT_MAX_OUTPUT_TOKENS, what it wrote and used kept; an end user past USER_DAILY_TOKENS today is refused new runs
with 429 `budget_exceeded` until midnight UTC, whichever way they ask; `GET /api/v1/usage` reports what their answers
used today and this month, as their answers' metadata says."""

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from channels.testing import WebsocketCommunicator
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.utils import timezone
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from bankagent.asgi import application
from bankagent.settings import _limit
from runs.models import DailyUsage
from runs.spending import Spending, usage_count
from tests.test_streaming_http import StreamClient, names, tokens
from threads.models import Approval, Message, Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runs_end_with_the_test")]

QUERY = "/api/v1/agent/query"
USAGE = "/api/v1/usage"
TIMEOUT = 20
NOW = datetime(2026, 3, 14, 21, 30, 15, 250_000, tzinfo=UTC)
MIDNIGHT = datetime(2026, 3, 15, tzinfo=UTC)
SECONDS_TO_MIDNIGHT = 8985
"""From NOW to MIDNIGHT: 2 h 29 min 44.75 s, rounded up."""
STORY = " ".join(f"word{index}" for index in range(40))


@pytest.fixture
def clock(monkeypatch) -> Iterator[list[datetime]]:
    """The time everything reads (the budget, the day an answer counts in): `clock[0]`, moved by the test."""
    now = [NOW]
    monkeypatch.setattr(timezone, "now", lambda: now[0])
    yield now


@pytest.fixture
def support_thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


@pytest.fixture
def chat_threads(transactional_db, user_id):
    def make(count: int = 1, *, user: uuid.UUID | None = None) -> list[Thread]:
        return [Thread.objects.create(user_id=user or user_id, agent_type="general_chat") for _ in range(count)]

    return make


def ask(client, thread: Thread, query: str = "What is my balance?"):
    return client.post(QUERY, {"thread_id": str(thread.pk), "query": query}, format="json")


def answer_of(thread: Thread) -> Message:
    return Message.objects.filter(thread=thread, role=Message.Role.ASSISTANT).latest("seq")


def counted() -> dict[str, object]:
    """What the users' days hold, all users and days together."""
    rows = list(DailyUsage.objects.values_list("input_tokens", "output_tokens"))
    return {"input_tokens": sum(row[0] for row in rows), "output_tokens": sum(row[1] for row in rows)}


def saved_tokens(*answers: Message) -> dict[str, int]:
    return {
        name: sum(answer.metadata["usage"][name] for answer in answers) for name in ("input_tokens", "output_tokens")
    }


# --- models ----------------------------------------------------------------------------------------------------------


def looks_up_forever(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": True})])


def looks_up_twice_then_answers(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    lookups = sum(isinstance(message, ModelResponse) for message in messages)
    if lookups < 2:
        return looks_up_forever(messages, info)
    advice = {"support_advice": "Your balance is fine.", "block_card": False, "risk_level": 0, "follow_up_actions": []}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, advice)])


async def tells_a_long_story(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for word in STORY.split(" "):
        yield f"{word} "


def priced(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """An answer whose price genai-prices knows: gpt-4o's, at $2.50 / $10 a million input / output tokens."""
    usage = RequestUsage(input_tokens=1000, output_tokens=10)
    return ModelResponse(parts=[TextPart("Priced.")], usage=usage, provider_name="openai")


# --- the settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [("", None), ("  ", None), ("1", 1), (" 2000 ", 2000)])
def test_a_limit_is_a_whole_number_or_unset_for_none(monkeypatch, raw, value):
    monkeypatch.setenv("USER_DAILY_TOKENS", raw)

    assert _limit("USER_DAILY_TOKENS") == value


@pytest.mark.parametrize("raw", ["0", "-5", "1e6", "lots"])
def test_a_limit_that_is_not_a_whole_number_of_at_least_1_stops_the_start(monkeypatch, raw):
    monkeypatch.setenv("AGENT_MAX_TOOL_CALLS", raw)

    with pytest.raises(ImproperlyConfigured, match="AGENT_MAX_TOOL_CALLS must be a whole number of at least 1"):
        _limit("AGENT_MAX_TOOL_CALLS")


# --- the limits of a run -----------------------------------------------------------------------------------------


def test_a_run_past_its_request_limit_stops_with_usage_limit_reached_and_its_use_is_kept(
    client, support_thread, settings
):
    settings.AGENT_MAX_REQUESTS = 3
    settings.AGENT_MODEL = FunctionModel(looks_up_forever, model_name="looper")

    response = ask(client, support_thread)

    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "usage_limit_reached"
    answer = answer_of(support_thread)
    assert (answer.status, answer.metadata["error"]["code"], answer.lease_expires_at) == (
        "failed",
        "usage_limit_reached",
        None,
    )
    assert (answer.metadata["usage"]["requests"], answer.metadata["usage"]["tool_calls"]) == (3, 3)
    assert answer.metadata["usage"]["output_tokens"] > 0
    assert counted() == saved_tokens(answer)
    # The thread is free for the next question.
    settings.AGENT_MODEL = "demo"
    assert ask(client, support_thread).status_code == 200


def test_a_run_past_its_tool_call_limit_stops_before_the_call_over_it(client, support_thread, settings):
    settings.AGENT_MAX_TOOL_CALLS = 2
    settings.AGENT_MODEL = FunctionModel(looks_up_forever, model_name="looper")

    response = ask(client, support_thread)

    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "usage_limit_reached"
    answer = answer_of(support_thread)
    assert (answer.status, answer.metadata["error"]["code"]) == ("failed", "usage_limit_reached")
    assert (answer.metadata["usage"]["requests"], answer.metadata["usage"]["tool_calls"]) == (3, 2)
    assert counted() == saved_tokens(answer)


def test_a_run_within_its_limits_answers(client, support_thread, settings):
    settings.AGENT_MAX_REQUESTS, settings.AGENT_MAX_TOOL_CALLS = 3, 2
    settings.AGENT_MODEL = FunctionModel(looks_up_twice_then_answers, model_name="careful")

    response = ask(client, support_thread)

    assert response.status_code == 200, response.content
    assert answer_of(support_thread).metadata["usage"]["requests"] == 3


async def test_a_stream_past_its_output_token_limit_ends_with_usage_limit_reached_keeping_what_it_wrote(
    api_key, user_id, chat_threads, settings
):
    settings.AGENT_MAX_OUTPUT_TOKENS = 10
    settings.AGENT_MODEL = FunctionModel(stream_function=tells_a_long_story, model_name="storyteller")
    (thread,) = await asyncio.to_thread(chat_threads)

    response = await StreamClient(api_key=api_key, user_id=user_id).post(thread.pk, "Tell me a story")

    events = response.events()
    assert response.status == 200
    assert names(events)[:2] == ["message_created", "message_started"]
    assert names(events)[-2:] == ["error", "done"]
    assert events[-2]["error_type"] == "usage_limit_reached"
    written = "".join(tokens(events))
    assert written and STORY.startswith(written.strip()) and len(written) < len(STORY)
    answer = await Message.objects.aget(thread=thread, role=Message.Role.ASSISTANT)
    assert (answer.status, answer.content, answer.metadata["error"]["code"]) == (
        "failed",
        written,
        "usage_limit_reached",
    )
    assert answer.metadata["usage"]["output_tokens"] > 10


# --- the daily budget of an end user -----------------------------------------------------------------------------


def test_a_user_past_their_daily_tokens_is_refused_on_every_thread_until_midnight_utc(
    client, chat_threads, settings, clock
):
    settings.USER_DAILY_TOKENS = 1
    first, second = chat_threads(2)
    assert ask(client, first, "Hello").status_code == 200
    used = sum(saved_tokens(answer_of(first)).values())

    response = ask(client, second, "Hello again")

    assert response.status_code == 429, response.content
    assert response["Retry-After"] == str(SECONDS_TO_MIDNIGHT)
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["details"] == {"limit": 1, "used": used, "renews_at": MIDNIGHT.isoformat()}
    assert not Message.objects.filter(thread=second).exists()
    # Deleting the thread that used them gives nothing back.
    first.delete()
    assert ask(client, second, "Hello again").status_code == 429
    # Midnight UTC: a new day, a new budget.
    clock[0] = MIDNIGHT
    assert ask(client, second, "Hello again").status_code == 200


def test_the_budget_is_each_users_own(client, chat_threads, settings, api_key, other_user_id):
    settings.USER_DAILY_TOKENS = 1
    (mine,) = chat_threads()
    (theirs,) = chat_threads(user=other_user_id)
    assert ask(client, mine, "Hello").status_code == 200
    assert ask(client, mine, "Hello").status_code == 429

    client.credentials(HTTP_X_API_KEY=api_key, HTTP_X_USER_ID=str(other_user_id))

    assert ask(client, theirs, "Hello").status_code == 200


async def test_a_stream_past_the_budget_is_refused_before_its_first_line(
    api_key, user_id, chat_threads, settings, clock
):
    settings.USER_DAILY_TOKENS = 1
    first, second = await asyncio.to_thread(chat_threads, 2)
    client = StreamClient(api_key=api_key, user_id=user_id)
    assert names((await client.post(first.pk, "Hello")).events())[-1] == "done"

    response = await client.post(second.pk, "Hello again")

    assert response.status == 429
    assert response.headers["retry-after"] == str(SECONDS_TO_MIDNIGHT)
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert not await Message.objects.filter(thread=second).aexists()


async def test_a_websocket_query_past_the_budget_gets_budget_exceeded_and_the_socket_stays_open(
    api_key, user_id, chat_threads, settings, clock
):
    settings.USER_DAILY_TOKENS = 1
    (thread,) = await asyncio.to_thread(chat_threads)
    headers = [(b"x-api-key", api_key.encode()), (b"x-user-id", str(user_id).encode())]
    socket = WebsocketCommunicator(application, f"/ws/v1/threads/{thread.pk}/", headers=headers)
    accepted, _ = await socket.connect(timeout=TIMEOUT)
    assert accepted
    try:
        await socket.send_json_to({"type": "query", "query": "Hello", "request_id": "first"})
        while (await socket.receive_json_from(timeout=TIMEOUT))["event"] != "done":
            pass

        await socket.send_json_to({"type": "query", "query": "Hello again", "request_id": "second"})

        error = await socket.receive_json_from(timeout=TIMEOUT)
        assert (error["event"], error["error_type"], error["request_id"]) == ("error", "budget_exceeded", "second")
        assert error["details"]["renews_at"] == MIDNIGHT.isoformat()
        assert await Message.objects.filter(thread=thread).acount() == 2
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=TIMEOUT) == {"event": "pong"}
    finally:
        await socket.disconnect()


def test_a_decision_past_the_budget_is_refused_and_the_approval_still_waits(client, support_thread, settings, clock):
    approval = ask(client, support_thread, "I lost my card").json()["approval"]
    settings.USER_DAILY_TOKENS = 1

    response = client.post(
        f"/api/v1/threads/{support_thread.pk}/approvals/{approval['id']}", {"approved": True}, format="json"
    )

    assert response.status_code == 429, response.content
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert response["Retry-After"] == str(SECONDS_TO_MIDNIGHT)
    assert Approval.objects.get(pk=approval["id"]).status == "pending"


def test_an_answer_that_went_on_after_its_approval_is_counted_once(client, support_thread):
    approval = ask(client, support_thread, "I lost my card").json()["approval"]

    response = client.post(
        f"/api/v1/threads/{support_thread.pk}/approvals/{approval['id']}", {"approved": True}, format="json"
    )

    assert response.status_code == 200, response.content
    answer = answer_of(support_thread)
    assert answer.metadata["usage"]["requests"] == 2  # the call that waited, then the answer after the decision
    assert counted() == saved_tokens(answer)


def test_answers_saved_at_the_same_moment_each_count_on_a_day_not_yet_counted(user_id):
    """Each saves in its own transaction, as run_finish does; on PostgreSQL they race for the day's first row."""
    savers = 6
    together = threading.Barrier(savers)

    def save() -> None:
        try:
            together.wait()
            with transaction.atomic():
                usage_count(Spending(user_id, 100, 10, Decimal("0.25")), now=NOW)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=save) for _ in range(savers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)

    (day,) = DailyUsage.objects.all()
    assert (day.user_id, day.day, day.input_tokens, day.output_tokens) == (user_id, NOW.date(), 600, 60)
    assert day.cost == Decimal("1.5")


# --- GET /api/v1/usage -------------------------------------------------------------------------------------------


def test_usage_reports_today_and_this_month_as_the_answers_metadata_says(client, chat_threads, settings, clock):
    settings.USER_DAILY_TOKENS = 1_000_000
    first, second = chat_threads(2)
    ask(client, first, "Hello")
    ask(client, second, "Tell me a story")
    saved = saved_tokens(answer_of(first), answer_of(second))

    response = client.get(USAGE)

    assert response.status_code == 200, response.content
    today = {
        "since": "2026-03-14T00:00:00Z",
        "input_tokens": saved["input_tokens"],
        "output_tokens": saved["output_tokens"],
        "total_tokens": saved["input_tokens"] + saved["output_tokens"],
        "cost": None,  # the demo model has no price
    }
    assert response.json() == {
        "today": today,
        "month": {**today, "since": "2026-03-01T00:00:00Z"},
        "daily_tokens": 1_000_000,
        "renews_at": "2026-03-15T00:00:00Z",
    }
    assert answer_of(first).metadata["cost"] is None


def test_usage_of_a_priced_model_has_its_cost_and_earlier_days_count_in_the_month_only(
    client, chat_threads, settings, clock
):
    settings.AGENT_MODEL = FunctionModel(priced, model_name="gpt-4o")
    first, second = chat_threads(2)
    clock[0] = NOW - timedelta(days=2)
    ask(client, first, "Hello")
    clock[0] = NOW
    ask(client, second, "Hello")

    usage = client.get(USAGE).json()

    assert answer_of(second).metadata["cost"] == "0.0026"
    assert (usage["today"]["total_tokens"], Decimal(usage["today"]["cost"])) == (1010, Decimal("0.0026"))
    assert (usage["month"]["total_tokens"], Decimal(usage["month"]["cost"])) == (2020, Decimal("0.0052"))
    assert usage["daily_tokens"] is None
    # One answer of unknown price (the demo model's) makes the day's cost, and the month's, unknown.
    settings.AGENT_MODEL = "demo"
    ask(client, first, "Hello")
    usage = client.get(USAGE).json()
    assert (usage["today"]["cost"], usage["month"]["cost"]) == (None, None)


def test_usage_of_a_user_with_no_answers_is_zero(client):
    usage = client.get(USAGE).json()

    assert usage["today"] == {
        "since": usage["today"]["since"],
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "cost": "0",
    }


def test_usage_needs_the_key(anonymous):
    response = anonymous.get(USAGE)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_usage_is_the_calling_users_own(client, chat_threads, api_key, other_user_id):
    (theirs,) = chat_threads(user=other_user_id)
    other = type(client)()
    other.credentials(HTTP_X_API_KEY=api_key, HTTP_X_USER_ID=str(other_user_id))
    assert ask(other, theirs, "Hello").status_code == 200

    assert client.get(USAGE).json()["today"]["total_tokens"] == 0
    assert other.get(USAGE).json()["today"]["total_tokens"] > 0
