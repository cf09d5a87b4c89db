"""POST /api/v1/agent/stream through the real ASGI application: NDJSON events, the run lease, disconnects, failures.

The view starts the run as a task of the server's event loop, so these tests drive `bankagent.asgi.application` in
their own loop (a synchronous test client's temporary loop would end the run with the request). The run writes
from other threads: every test is transactional.
"""

import asyncio
import copy
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from django.utils import timezone
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agents import demo_script
from bankagent.asgi import application
from identity.models import APIKey
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

STREAM_PATH = "/api/v1/agent/stream"
TIMEOUT = 20.0
"""Upper bound, in seconds, of any one step: a hung stream fails the test instead of the whole run."""
SUPPORT_FIELDS = ["support_advice", "block_card", "risk_level", "follow_up_actions"]
"""The order in which the demo model writes SupportOutput's fields."""


# --- fixtures: the conftest ones request `db`; these work with the transactional database ---------------------------


@pytest.fixture
def api_key(transactional_db) -> str:
    _, key = APIKey.objects.create_key(name="streaming tests")
    return key


@pytest.fixture
def support_thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


@pytest.fixture
def chat_thread(transactional_db, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="general_chat")


@pytest.fixture(autouse=True)
async def _no_run_left_behind(settings, transactional_db):
    """A channel layer of this test's own event loop; no run may outlive the test and write during the flush."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    yield
    # A run's assistant message stays `incomplete` until its answer is saved and its lease released.
    async with asyncio.timeout(TIMEOUT):
        while await Message.objects.filter(status=Message.Status.INCOMPLETE).aexists():
            await asyncio.sleep(0.05)
    # What is left of the run then (its last events, leaving the control group) writes nothing: let it end.
    await asyncio.sleep(0.1)


# --- driving the ASGI application ------------------------------------------------------------------------------------


@dataclass
class StreamResponse:
    status: int
    headers: dict[str, str]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    """Each http.response.body message's body, with the monotonic time it arrived."""

    @property
    def body(self) -> bytes:
        return b"".join(body for _, body in self.chunks)

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def timed_events(self) -> list[tuple[float, dict[str, Any]]]:
        """Every NDJSON line as an object, with the time its last byte arrived."""
        events, pending = [], b""
        for at, body in self.chunks:
            pending += body
            *lines, pending = pending.split(b"\n")
            events.extend((at, json.loads(line)) for line in lines)
        assert pending == b"", f"the stream does not end with a newline: {pending!r}"
        return events

    def events(self) -> list[dict[str, Any]]:
        return [event for _, event in self.timed_events()]


class StreamClient:
    def __init__(self, *, api_key: str | None, user_id: uuid.UUID) -> None:
        self.api_key, self.user_id = api_key, user_id

    def headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(b"host", b"localhost"), (b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"x-user-id", str(self.user_id).encode()))
        if self.api_key is not None:
            headers.append((b"x-api-key", self.api_key.encode()))
        return headers

    async def open(self, thread_id: uuid.UUID, query: str) -> tuple[ApplicationCommunicator, StreamResponse]:
        """Send the request and read the response's start; the body is left to read."""
        body = json.dumps({"thread_id": str(thread_id), "query": query}).encode()
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": STREAM_PATH,
            "raw_path": STREAM_PATH.encode(),
            "query_string": b"",
            "headers": self.headers(body),
            "client": ("127.0.0.1", 40000),
            "server": ("localhost", 80),
        }
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
        start = await communicator.receive_output(timeout=TIMEOUT)
        assert start["type"] == "http.response.start"
        headers = {name.decode().lower(): value.decode() for name, value in start.get("headers", [])}
        return communicator, StreamResponse(status=start["status"], headers=headers)

    async def post(self, thread_id: uuid.UUID, query: str) -> StreamResponse:
        communicator, response = await self.open(thread_id, query)
        await read_to_end(communicator, response)
        return response


async def read_chunk(communicator: ApplicationCommunicator, response: StreamResponse) -> bool:
    """Read one body message into `response`; whether more follow."""
    message = await communicator.receive_output(timeout=TIMEOUT)
    assert message["type"] == "http.response.body"
    response.chunks.append((time.monotonic(), message.get("body", b"")))
    return message.get("more_body", False)


async def read_to_end(communicator: ApplicationCommunicator, response: StreamResponse) -> StreamResponse:
    async with asyncio.timeout(TIMEOUT):
        while await read_chunk(communicator, response):
            pass
    await communicator.wait(timeout=TIMEOUT)
    return response


@pytest.fixture
def stream_client(api_key, user_id) -> StreamClient:
    return StreamClient(api_key=api_key, user_id=user_id)


# --- database reads from async tests ---------------------------------------------------------------------------------


@sync_to_async
def messages_of(thread_id: uuid.UUID) -> list[Message]:
    return list(Message.objects.filter(thread_id=thread_id).order_by("seq"))


@sync_to_async
def message_count() -> int:
    return Message.objects.count()


@sync_to_async
def reload(thread: Thread) -> Thread:
    return Thread.objects.get(pk=thread.pk)


@sync_to_async
def set_lease(thread: Thread, *, token: uuid.UUID, heartbeat_age: timedelta) -> None:
    Thread.objects.filter(pk=thread.pk).update(run_token=token, run_heartbeat=timezone.now() - heartbeat_age)


async def settled_answer(thread_id: uuid.UUID) -> Message:
    """The thread's latest assistant message, once its run has saved it (polled: the run is in the background)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            answer = [m for m in await messages_of(thread_id) if m.role == Message.Role.ASSISTANT][-1]
            if answer.status != Message.Status.INCOMPLETE:
                return answer
            await asyncio.sleep(0.05)


def names(events: list[dict[str, Any]]) -> list[str]:
    return [event["event"] for event in events]


def tokens(events: list[dict[str, Any]]) -> list[str]:
    return [event["token"] for event in events if event["event"] == "text_delta"]


# --- the happy path --------------------------------------------------------------------------------------------------


async def test_balance_question_streams_contract_events_in_order(stream_client, support_thread):
    response = await stream_client.post(support_thread.pk, "What is my balance?")

    assert response.status == 200
    assert response.headers["content-type"].split(";")[0] == "application/x-ndjson"
    # One JSON object per line, every line an event.
    lines = response.body.split(b"\n")
    assert lines[-1] == b"" and all(isinstance(json.loads(line), dict) for line in lines[:-1])
    events = response.events()
    assert all("event" in event for event in events)
    kinds = names(events)
    assert kinds[:4] == ["message_created", "message_started", "tool_call", "tool_result"]
    assert kinds[-2:] == ["message_complete", "done"]
    assert kinds[4:-2] and set(kinds[4:-2]) == {"text_delta"}

    question, answer = await messages_of(support_thread.pk)
    assert events[0]["message"]["id"] == str(question.id)
    assert events[0]["message"]["role"] == "user"
    assert events[1]["message_id"] == str(answer.id)
    assert all(event["message_id"] == str(answer.id) for event in events[1:-1])
    assert events[2]["tool_call"] == {"name": "customer_balance", "args": {"include_pending": False}}
    # The contract leaves the tool_result payload open: the tool's value, bare or as the `content` of an object.
    result = events[3]["tool_result"]
    assert 1123.45 in (result, result.get("content") if isinstance(result, dict) else None)
    assert (question.role, question.content, answer.status) == ("user", "What is my balance?", "complete")


async def test_support_tokens_are_growing_partial_outputs_of_fields_already_produced(stream_client, support_thread):
    events = (await stream_client.post(support_thread.pk, "What is my balance?")).events()
    partials = [json.loads(token) for token in tokens(events)]
    _, answer = await messages_of(support_thread.pk)

    assert len(partials) > 3
    # Only the advice exists when the first token goes out: no default stands in for an undecided field.
    assert list(partials[0]) == ["support_advice"]
    final = answer.output
    for partial in partials:
        assert isinstance(partial, dict)
        # The model writes the fields in order, so what a token holds is a prefix of that order ...
        assert list(partial) == SUPPORT_FIELDS[: len(partial)], partial
        # ... and every field but the one being written already holds its final value.
        for name in list(partial)[:-1]:
            assert partial[name] == final[name], (name, partial)
    advice = [partial["support_advice"] for partial in partials]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(advice))
    assert len(advice[0]) < len(advice[-1])
    assert partials[-1] == final
    assert final["support_advice"] == "John, your current balance is $1,123.45."
    assert json.loads(answer.content) == final

    assert answer.status == Message.Status.COMPLETE
    metadata = answer.metadata
    assert metadata["model"] == "demo"
    assert isinstance(metadata["duration_ms"], int) and metadata["duration_ms"] >= 0
    assert metadata["usage"]["requests"] == 2 and metadata["usage"]["tool_calls"] == 1
    assert {"input_tokens", "output_tokens", "total_tokens"} <= metadata["usage"].keys()
    assert isinstance(metadata["time_to_first_token_ms"], int)
    assert 0 <= metadata["time_to_first_token_ms"] <= metadata["duration_ms"]


async def test_chat_tokens_are_the_new_text_since_the_last_delta(stream_client, chat_thread):
    events = (await stream_client.post(chat_thread.pk, "What are your opening hours?")).events()
    deltas = tokens(events)
    _, answer = await messages_of(chat_thread.pk)

    assert len(deltas) > 5 and all(deltas)
    # Cumulative tokens would repeat the start of the answer over and over.
    assert "".join(deltas) == answer.content
    assert answer.content.startswith("Good question. About “What are your opening hours”")
    assert (answer.status, answer.output) == ("complete", None)
    assert names(events)[-2:] == ["message_complete", "done"]


# --- one run per thread ----------------------------------------------------------------------------------------------


async def test_query_while_a_run_streams_is_409_thread_busy_and_writes_nothing(stream_client, chat_thread, settings):
    settings.DEMO_MODEL_DELAY_MS = 30
    communicator, first = await stream_client.open(chat_thread.pk, "Write me a poem")
    assert first.status == 200
    async with asyncio.timeout(TIMEOUT):
        while "text_delta" not in first.body.decode():
            assert await read_chunk(communicator, first)
    before = [(m.id, m.role, m.status, m.content) for m in await messages_of(chat_thread.pk)]
    lease_before = (await reload(chat_thread)).run_token

    busy = await stream_client.post(chat_thread.pk, "Are you still there?")

    assert busy.status == 409
    assert busy.headers["content-type"].split(";")[0] == "application/json"
    assert busy.json()["error"]["code"] == "thread_busy"
    assert [(m.id, m.role, m.status, m.content) for m in await messages_of(chat_thread.pk)] == before
    assert lease_before is not None
    assert (await reload(chat_thread)).run_token == lease_before

    await read_to_end(communicator, first)
    assert names(first.events())[-2:] == ["message_complete", "done"]
    assert (await settled_answer(chat_thread.pk)).content == demo_script.POEM

    settings.DEMO_MODEL_DELAY_MS = 0
    again = await stream_client.post(chat_thread.pk, "Hello")
    assert again.status == 200
    assert names(again.events())[-2:] == ["message_complete", "done"]
    assert [m.content for m in await messages_of(chat_thread.pk) if m.role == "user"] == ["Write me a poem", "Hello"]


async def test_lease_of_a_crashed_run_lapses_after_run_lease_seconds(stream_client, chat_thread, settings):
    dead = uuid.uuid4()
    await set_lease(chat_thread, token=dead, heartbeat_age=timedelta(seconds=settings.RUN_LEASE_SECONDS + 1))

    response = await stream_client.post(chat_thread.pk, "Hello")

    assert response.status == 200
    assert names(response.events())[-2:] == ["message_complete", "done"]
    _, answer = await messages_of(chat_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    thread = await reload(chat_thread)
    assert thread.run_token is None and thread.run_heartbeat is None


async def test_live_lease_of_another_run_is_409_thread_busy(stream_client, chat_thread, settings):
    other = uuid.uuid4()
    await set_lease(chat_thread, token=other, heartbeat_age=timedelta(seconds=1))

    response = await stream_client.post(chat_thread.pk, "Hello")

    assert response.status == 409
    assert response.json()["error"]["code"] == "thread_busy"
    assert await messages_of(chat_thread.pk) == []
    assert (await reload(chat_thread)).run_token == other


# --- the client goes, the model fails --------------------------------------------------------------------------------


async def test_client_gone_mid_stream_does_not_lose_the_answer(stream_client, chat_thread, settings):
    settings.DEMO_MODEL_DELAY_MS = 20
    communicator, response = await stream_client.open(chat_thread.pk, "Write me a poem")
    assert response.status == 200
    for _ in range(4):
        assert await read_chunk(communicator, response)

    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=TIMEOUT)

    # Still running when the client left: the test would prove nothing otherwise.
    assert [m.status for m in await messages_of(chat_thread.pk)] == ["complete", "incomplete"]
    answer = await settled_answer(chat_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    assert answer.content == demo_script.POEM
    assert (await reload(chat_thread)).run_token is None


async def test_model_failure_mid_stream_ends_with_error_then_done_and_saves_the_partial_answer(
    stream_client, chat_thread, settings
):
    async def fails_mid_stream(messages: list[ModelMessage], info: AgentInfo):
        for chunk in ["The answer", " is", " forty"]:
            yield chunk
        raise ModelHTTPError(status_code=500, model_name="x", body="secret provider detail")

    settings.AGENT_MODEL = FunctionModel(stream_function=fails_mid_stream)

    response = await stream_client.post(chat_thread.pk, "What is the answer?")

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[:2] == ["message_created", "message_started"]
    assert kinds[-2:] == ["error", "done"]
    assert "message_complete" not in kinds
    error = events[-2]
    assert error["error_type"] == "model_error"
    assert error["error"] and "secret" not in error["error"]
    assert "secret provider detail" not in response.body.decode()
    deltas = "".join(tokens(events))
    assert deltas and "The answer is forty".startswith(deltas)

    question, answer = await messages_of(chat_thread.pk)
    assert (question.role, question.content, question.status) == ("user", "What is the answer?", "complete")
    assert (answer.role, answer.status, answer.content) == ("assistant", "failed", deltas)
    assert answer.metadata["error"]["code"] == "model_error"
    assert "secret provider detail" not in json.dumps(answer.metadata)
    assert (await reload(chat_thread)).run_token is None


# --- refused before anything runs ------------------------------------------------------------------------------------


async def assert_json_error(response: StreamResponse, status: int, code: str) -> None:
    assert response.status == status
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.json()["error"]["code"] == code
    assert await message_count() == 0


async def test_blank_query_is_422_and_writes_nothing(stream_client, chat_thread):
    response = await stream_client.post(chat_thread.pk, "   ")

    await assert_json_error(response, 422, "validation_error")
    assert (await reload(chat_thread)).run_token is None


async def test_foreign_thread_is_404_and_writes_nothing(stream_client, other_user_id):
    foreign = await sync_to_async(Thread.objects.create)(user_id=other_user_id, agent_type="general_chat")

    response = await stream_client.post(foreign.pk, "Hello")

    await assert_json_error(response, 404, "not_found")
    assert (await reload(foreign)).run_token is None


async def test_missing_api_key_is_401_and_writes_nothing(chat_thread, user_id):
    response = await StreamClient(api_key=None, user_id=user_id).post(chat_thread.pk, "Hello")

    await assert_json_error(response, 401, "not_authenticated")
    assert (await reload(chat_thread)).run_token is None


# --- flushed as produced ---------------------------------------------------------------------------------------------


async def test_events_are_flushed_as_the_model_produces_them(stream_client, chat_thread, settings):
    delay = 0.040
    settings.DEMO_MODEL_DELAY_MS = round(delay * 1000)

    response = await stream_client.post(chat_thread.pk, "What are your opening hours?")

    timed = response.timed_events()
    delta_times = [at for at, event in timed if event["event"] == "text_delta"]
    done_at = next(at for at, event in timed if event["event"] == "done")
    assert len(delta_times) > 20
    # The demo model pauses `delay` between chunks: a buffered answer would arrive all at once.
    assert delta_times[-1] - delta_times[0] >= 10 * delay
    assert done_at - delta_times[0] >= 10 * delay
    assert len({round(at, 3) for at in delta_times}) > 10
