"""POST /api/v1/agent/stream through the real ASGI application: NDJSON events, the run lease, disconnects, failures.

The view starts the run as a task of the server's event loop, so these tests drive `bankagent.asgi.application` in
their own loop (a synchronous test client's temporary loop would end the run with the request). The run writes
from other threads: every test is transactional.

Where a test needs the run at a known point, the model is a `HeldModel`: it streams its next chunk only when the
test lets it, so nothing here depends on how fast anything runs.
"""

import asyncio
import contextlib
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import ApplicationCommunicator
from django.db import OperationalError
from django.utils import timezone
from pydantic_ai.exceptions import ModelHTTPError, ModelTimeoutError
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.settings import ModelSettings

from agents.demo import build_demo_model
from bankagent.asgi import application
from identity.models import APIKey
from runs import keeper, lease, runner
from runs.broadcast import Broadcast
from tests.conftest import begin_run
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

STREAM_PATH = "/api/v1/agent/stream"
TIMEOUT = 20.0
"""Upper bound, in seconds, of any one step: a hung stream fails the test instead of the whole run."""
POLL = 0.01
SUPPORT_FIELDS = ["support_advice", "block_card", "risk_level", "follow_up_actions"]
"""The order in which the demo model writes SupportOutput's fields."""


# --- fixtures: the conftest ones request `db`; these work with the transactional database ---------------------------


@pytest.fixture
def api_key(transactional_db) -> str:
    _, key = APIKey.objects.create_key(name="streaming tests")
    return key


@pytest.fixture(autouse=True)
def _no_run_left_behind(checked_runs):
    pass


# --- models the test holds at a known point ---------------------------------------------------------------------------


class HeldModel:
    """Streams `chunks` of text, each only once the test has released it: the test knows where the model stands."""

    def __init__(self, chunks: list[str], *, released: int = 1) -> None:
        self.chunks = chunks
        self.gates = [asyncio.Event() for _ in chunks]
        self.produced = 0
        self.release(released)

    async def stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for gate, chunk in zip(self.gates, self.chunks, strict=True):
            await gate.wait()
            self.produced += 1
            yield chunk

    def release(self, count: int = 1) -> None:
        for gate in [gate for gate in self.gates if not gate.is_set()][:count]:
            gate.set()

    def release_all(self) -> None:
        self.release(len(self.chunks))

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def model(self) -> FunctionModel:
        return FunctionModel(stream_function=self.stream, model_name="held")


class CountingDemoModel:
    """The demo model at delay 0, keeping the chunks of each response it streams."""

    def __init__(self) -> None:
        demo = build_demo_model(delay_ms=0)
        self.responses: list[list[str | DeltaToolCalls]] = []

        async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
            pieces: list[str | DeltaToolCalls] = []
            self.responses.append(pieces)
            async for piece in demo.stream_function(messages, info):
                pieces.append(piece)
                yield piece

        self.model = FunctionModel(demo.function, stream_function=stream, model_name="demo")

    @property
    def answer_chunks(self) -> int:
        """Chunks of the response that holds the answer (the last one)."""
        return len(self.responses[-1])


# --- driving the ASGI application ------------------------------------------------------------------------------------


@dataclass
class StreamResponse:
    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)
    """Each http.response.body message's body, in order."""
    ended: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        """Every complete NDJSON line received so far, as an object."""
        *lines, rest = self.body.split(b"\n")
        assert not (self.ended and rest), f"the stream does not end with a newline: {rest!r}"
        return [json.loads(line) for line in lines]


@dataclass
class StalledReader:
    """A client that reads no body until `resume()`: meanwhile the server's sends wait, as they do on a connection
    whose buffers are full."""

    reading: asyncio.Event = field(default_factory=asyncio.Event)

    def resume(self) -> None:
        self.reading.set()

    def wrap(self, app: Callable) -> Callable:
        async def app_with_stalled_client(scope: dict, receive: Callable, send: Callable) -> None:
            async def send_once_read(message: dict) -> None:
                if message["type"] == "http.response.body":
                    await self.reading.wait()
                await send(message)

            await app(scope, receive, send_once_read)

        return app_with_stalled_client


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

    async def open(
        self, thread_id: uuid.UUID, query: str, *, reader: StalledReader | None = None
    ) -> tuple[ApplicationCommunicator, StreamResponse]:
        """Send the request and read the response's start; the body is left to read."""
        communicator = await self.send(thread_id, query, reader=reader)
        start = await communicator.receive_output(timeout=TIMEOUT)
        assert start["type"] == "http.response.start"
        headers = {name.decode().lower(): value.decode() for name, value in start.get("headers", [])}
        return communicator, StreamResponse(status=start["status"], headers=headers)

    async def send(
        self, thread_id: uuid.UUID, query: str, *, reader: StalledReader | None = None
    ) -> ApplicationCommunicator:
        """Send the request; its answer is left to read."""
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
        app = application if reader is None else reader.wrap(application)
        communicator = ApplicationCommunicator(app, scope)
        await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
        return communicator

    async def post(self, thread_id: uuid.UUID, query: str) -> StreamResponse:
        communicator, response = await self.open(thread_id, query)
        await read_to_end(communicator, response)
        return response


async def read_chunk(communicator: ApplicationCommunicator, response: StreamResponse) -> bool:
    """Read one body message into `response`; whether more follow."""
    message = await communicator.receive_output(timeout=TIMEOUT)
    assert message["type"] == "http.response.body"
    response.chunks.append(message.get("body", b""))
    response.ended = not message.get("more_body", False)
    return not response.ended


async def read_until(
    communicator: ApplicationCommunicator, response: StreamResponse, condition: Callable[[list[dict]], bool]
) -> list[dict[str, Any]]:
    """Read until the events received so far meet `condition`; the stream must not end first."""
    async with asyncio.timeout(TIMEOUT):
        while not condition(events := response.events()):
            assert await read_chunk(communicator, response), f"the stream ended first: {response.events()}"
    return events


async def read_tokens(communicator: ApplicationCommunicator, response: StreamResponse, count: int) -> list[str]:
    """Read until `count` text deltas have arrived."""
    events = await read_until(communicator, response, lambda events: len(tokens(events)) >= count)
    return tokens(events)


async def read_to_end(communicator: ApplicationCommunicator, response: StreamResponse) -> StreamResponse:
    async with asyncio.timeout(TIMEOUT):
        while await read_chunk(communicator, response):
            pass
    await communicator.wait(timeout=TIMEOUT)
    return response


@pytest.fixture
def stream_client(api_key, user_id) -> StreamClient:
    return StreamClient(api_key=api_key, user_id=user_id)


# --- database reads and writes from async tests ----------------------------------------------------------------------


@sync_to_async
def messages_of(thread_id: uuid.UUID) -> list[Message]:
    return list(Message.objects.filter(thread_id=thread_id).order_by("seq"))


@sync_to_async
def message(message_id: uuid.UUID | str) -> Message:
    return Message.objects.get(pk=message_id)


@sync_to_async
def message_count() -> int:
    return Message.objects.count()


@sync_to_async
def any_in_progress() -> bool:
    return Message.objects.filter(status=Message.Status.IN_PROGRESS).exists()


@sync_to_async
def set_lease_expiry(message_id: uuid.UUID | str, at: datetime) -> None:
    Message.objects.filter(pk=message_id).update(lease_expires_at=at)


@sync_to_async
def unfinished_run(thread: Thread, *, lease_seconds: float) -> Message:
    """The answer of a run that started on `thread` and never finished (its process died, or it is still running
    elsewhere), its lease ending `lease_seconds` from now: negative for one that has lapsed."""
    return begin_run(thread, "Are you there?", lease_seconds=lease_seconds).assistant_message


async def runs_finished() -> None:
    """Wait until every run started so far has ended: its answer saved, its last events handed on.

    Waiting on the runs rather than polling their answers also keeps the test's reads from meeting the run's
    writes: SQLite's shared in-memory test database refuses such a write at once ("database table is locked")
    instead of letting it wait its turn as the WAL file database of a server does.
    """
    if runs := set(runner._RUNS):
        _, pending = await asyncio.wait(runs, timeout=TIMEOUT)
        assert not pending, "a run did not end"


async def settled_answer(thread_id: uuid.UUID) -> Message:
    """The thread's latest assistant message, once its run has ended."""
    await runs_finished()
    return [m for m in await messages_of(thread_id) if m.role == Message.Role.ASSISTANT][-1]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [event["event"] for event in events]


def tokens(events: list[dict[str, Any]]) -> list[str]:
    return [event["token"] for event in events if event["event"] == "text_delta"]


def assert_partials_of(partials: list[dict[str, Any]], final: dict[str, Any]) -> None:
    """Each partial output holds a prefix of the fields in the order the model writes them, every field but the one
    being written already at its final value."""
    for partial in partials:
        assert isinstance(partial, dict)
        assert list(partial) == SUPPORT_FIELDS[: len(partial)], partial
        for name in list(partial)[:-1]:
            assert partial[name] == final[name], (name, partial)


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
    complete = events[-2]
    assert (complete["status"], complete["content"], complete["output"]) == ("complete", answer.content, answer.output)


async def test_support_tokens_are_growing_partial_outputs_of_fields_already_produced(stream_client, support_thread):
    events = (await stream_client.post(support_thread.pk, "What is my balance?")).events()
    partials = [json.loads(token) for token in tokens(events)]
    _, answer = await messages_of(support_thread.pk)

    assert len(partials) > 3
    # Only the advice exists when the first token goes out: no default stands in for an undecided field.
    assert list(partials[0]) == ["support_advice"]
    final = answer.output
    # The model writes the fields in order, so what a token holds is a prefix of that order, and every field but
    # the one being written already holds its final value.
    assert_partials_of(partials, final)
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


async def test_debounced_structured_tokens_are_fewer_than_chunks_and_each_a_valid_partial(
    stream_client, support_thread, settings, monkeypatch
):
    # Far longer than the whole answer takes at delay 0: the chunks arrive within one window, whatever the speed.
    settings.STREAM_DEBOUNCE_MS = 1000
    demo = CountingDemoModel()
    settings.AGENT_MODEL = demo.model
    emitted = []
    emit = Broadcast.emit

    def recorded_emit(broadcast: Broadcast, event: dict[str, Any]) -> None:
        emitted.append(event)
        emit(broadcast, event)

    # What the run produced, before a reader that falls behind merges deltas of its own.
    monkeypatch.setattr(Broadcast, "emit", recorded_emit)

    events = (await stream_client.post(support_thread.pk, "What is my balance?")).events()

    answer = await settled_answer(support_thread.pk)
    # Validated once per window rather than once per chunk (which gives a delta for most chunks).
    assert 0 < len(tokens(emitted)) < demo.answer_chunks / 2
    partials = [json.loads(token) for token in tokens(events)]
    assert 0 < len(partials) < demo.answer_chunks
    assert_partials_of(partials, answer.output)
    assert partials[-1] == answer.output
    assert names(events)[-2:] == ["message_complete", "done"]


async def test_legacy_key_gets_token_events_and_no_tool_events(support_thread, user_id):
    _, key = await sync_to_async(APIKey.objects.create_key)(name="legacy client", events=APIKey.Events.LEGACY)

    response = await StreamClient(api_key=key, user_id=user_id).post(support_thread.pk, "What is my balance?")

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[:2] == ["message_created", "message_started"]
    assert kinds[-2:] == ["message_complete", "done"]
    assert kinds[2:-2] and set(kinds[2:-2]) == {"token"}
    answer = await settled_answer(support_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    assert json.loads([event["token"] for event in events if event["event"] == "token"][-1]) == answer.output


# --- flushed as produced ---------------------------------------------------------------------------------------------


async def test_events_are_flushed_as_the_model_produces_them(stream_client, chat_thread, settings):
    held = HeldModel(["Once", " upon", " a", " time."])
    settings.AGENT_MODEL = held.model()

    communicator, response = await stream_client.open(chat_thread.pk, "Tell me a story")
    for count, chunk in enumerate(held.chunks, start=1):
        deltas = await read_tokens(communicator, response, count)
        # The model waits before its next chunk: this delta reached the client before anything after it existed.
        assert held.produced == count
        assert deltas == held.chunks[:count]
        assert deltas[-1] == chunk
        held.release()
    await read_to_end(communicator, response)

    assert names(response.events())[-2:] == ["message_complete", "done"]
    assert (await settled_answer(chat_thread.pk)).content == held.text


# --- one run per thread ----------------------------------------------------------------------------------------------


async def test_query_while_a_run_streams_is_409_thread_busy_and_writes_nothing(stream_client, chat_thread, settings):
    held = HeldModel(["Roses", " are", " red."])
    settings.AGENT_MODEL = held.model()
    communicator, first = await stream_client.open(chat_thread.pk, "Write me a poem")
    assert first.status == 200
    await read_tokens(communicator, first, 1)
    before = [(m.id, m.role, m.status, m.content, m.lease_expires_at) for m in await messages_of(chat_thread.pk)]
    assert [status for _, _, status, _, _ in before] == ["complete", "in_progress"]

    busy = await stream_client.post(chat_thread.pk, "Are you still there?")

    assert busy.status == 409
    assert busy.headers["content-type"].split(";")[0] == "application/json"
    assert busy.json()["error"]["code"] == "thread_busy"
    after = [(m.id, m.role, m.status, m.content, m.lease_expires_at) for m in await messages_of(chat_thread.pk)]
    assert after == before

    held.release_all()
    await read_to_end(communicator, first)
    assert names(first.events())[-2:] == ["message_complete", "done"]
    assert (await settled_answer(chat_thread.pk)).content == held.text

    settings.AGENT_MODEL = "demo"
    again = await stream_client.post(chat_thread.pk, "Hello")
    assert again.status == 200
    assert names(again.events())[-2:] == ["message_complete", "done"]
    assert [m.content for m in await messages_of(chat_thread.pk) if m.role == "user"] == ["Write me a poem", "Hello"]


async def test_lapsed_lease_of_a_crashed_run_is_marked_interrupted_and_the_query_answered(stream_client, chat_thread):
    crashed = await unfinished_run(chat_thread, lease_seconds=-1)

    response = await stream_client.post(chat_thread.pk, "Hello")

    assert response.status == 200
    assert names(response.events())[-2:] == ["message_complete", "done"]
    _, interrupted, _, answer = await messages_of(chat_thread.pk)
    assert interrupted.id == crashed.id
    assert (interrupted.status, interrupted.metadata["error"]["code"]) == ("failed", "run_interrupted")
    assert interrupted.lease_expires_at is None
    assert (answer.status, answer.lease_expires_at) == ("complete", None)


async def test_live_lease_of_another_run_is_409_thread_busy(stream_client, chat_thread):
    running = await unfinished_run(chat_thread, lease_seconds=30)
    before = [(m.id, m.status, m.lease_expires_at) for m in await messages_of(chat_thread.pk)]

    response = await stream_client.post(chat_thread.pk, "Hello")

    assert response.status == 409
    assert response.json()["error"]["code"] == "thread_busy"
    assert [(m.id, m.status, m.lease_expires_at) for m in await messages_of(chat_thread.pk)] == before
    assert (await message(running.id)).status == Message.Status.IN_PROGRESS


async def test_crashed_run_keeps_its_checkpoint_until_its_lease_lapses_then_the_next_query_marks_it_interrupted(
    stream_client, chat_thread, settings, monkeypatch
):
    settings.RUN_CHECKPOINT_SECONDS = 0.02  # the lease itself (an hour) lapses when the test says so
    checkpoints = []
    real_renew = keeper.runs_renew

    def recorded_renew(**kwargs: Any) -> set:
        lost = real_renew(**kwargs)
        checkpoints.extend(content for pk, (content, _) in kwargs["checkpoints"].items() if pk not in lost)
        return lost

    monkeypatch.setattr(keeper, "runs_renew", recorded_renew)
    held = HeldModel(["The answer", " is", " forty", " two."], released=3)
    settings.AGENT_MODEL = held.model()
    communicator, response = await stream_client.open(chat_thread.pk, "What is the answer?")
    await read_tokens(communicator, response, 3)
    answer_id = response.events()[1]["message_id"]
    partial = "The answer is forty"
    # Watched through the run's own writes: polling the database would race them (see `runs_finished`).
    async with asyncio.timeout(TIMEOUT):
        while partial not in checkpoints:
            await asyncio.sleep(POLL)

    # The process dies: its run task stops where it stands, saving nothing more.
    (run,) = runner._RUNS
    run.cancel()
    await asyncio.wait({run})
    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=TIMEOUT)
    # A renewal already under way on the keeper's own thread ends before the lease is made to lapse.
    await asyncio.get_running_loop().run_in_executor(keeper.keeper_db.executor, lambda: None)

    crashed = await message(answer_id)
    assert (crashed.status, crashed.content) == ("in_progress", partial)
    # Until its lease lapses, the thread stays taken.
    assert (await stream_client.post(chat_thread.pk, "Hello?")).status == 409

    await set_lease_expiry(answer_id, timezone.now() - timedelta(seconds=1))
    settings.AGENT_MODEL = "demo"
    again = await stream_client.post(chat_thread.pk, "Hello")

    assert again.status == 200
    assert names(again.events())[-2:] == ["message_complete", "done"]
    messages = await messages_of(chat_thread.pk)
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"),
        ("assistant", "failed"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    interrupted = messages[1]
    assert (interrupted.content, interrupted.metadata["error"]["code"]) == (partial, "run_interrupted")
    assert not await any_in_progress()


class Clock:
    """`timezone.now` standing still until the test moves it: leases lapse when the test says."""

    def __init__(self) -> None:
        self.at = timezone.now()

    def __call__(self) -> datetime:
        return self.at

    def advance_to(self, at: datetime) -> None:
        self.at = at


async def test_heartbeat_survives_database_errors_and_no_second_run_starts_meanwhile(
    stream_client, chat_thread, settings, monkeypatch
):
    lease = timedelta(seconds=0.3)
    settings.RUN_LEASE_SECONDS = lease.total_seconds()  # a renewal every 0.1 s of real time
    settings.RUN_CHECKPOINT_SECONDS = 2
    clock = Clock()
    monkeypatch.setattr(timezone, "now", clock)
    failures, renewed_at = [], []
    # Held by the test while it uses the database itself: the run's renewals then wait (see `runs_finished`).
    database = threading.Lock()
    real_renew = keeper.runs_renew

    def flaky_renew(**kwargs: Any) -> set:
        with database:
            if len(failures) < 3:
                failures.extend(kwargs["message_ids"])
                raise OperationalError("server closed the connection unexpectedly")
            lost = real_renew(**kwargs)
            renewed_at.append(clock())
            return lost

    @contextlib.asynccontextmanager
    async def renewals_waiting() -> AsyncIterator[None]:
        await asyncio.to_thread(database.acquire)
        try:
            yield
        finally:
            database.release()

    monkeypatch.setattr(keeper, "runs_renew", flaky_renew)
    held = HeldModel(["Still", " here", "."])
    settings.AGENT_MODEL = held.model()
    communicator, response = await stream_client.open(chat_thread.pk, "Are you there?")
    await read_tokens(communicator, response, 1)
    answer_id = response.events()[1]["message_id"]
    async with renewals_waiting():
        original = (await message(answer_id)).lease_expires_at
    assert original == clock.at + lease

    async with asyncio.timeout(TIMEOUT):
        while len(failures) < 3:
            await asyncio.sleep(POLL)
    # The renewals failed: the lease taken at the start still holds the thread.
    clock.advance_to(original - lease / 10)
    async with renewals_waiting():
        assert (await stream_client.post(chat_thread.pk, "Anyone else?")).status == 409
    # Then a renewal gets through ...
    async with asyncio.timeout(TIMEOUT):
        while not renewed_at or renewed_at[-1] < clock.at:
            await asyncio.sleep(POLL)
    # ... and holds the thread past the end of the first lease.
    clock.advance_to(original + lease / 2)
    async with renewals_waiting():
        assert (await message(answer_id)).lease_expires_at > clock.at
        assert (await stream_client.post(chat_thread.pk, "Anyone else?")).status == 409

    held.release_all()
    await read_to_end(communicator, response)

    assert names(response.events())[-2:] == ["message_complete", "done"]
    assert failures == [uuid.UUID(answer_id)] * 3
    answer = await settled_answer(chat_thread.pk)
    assert (answer.status, answer.content) == ("complete", held.text)
    assert [m.role for m in await messages_of(chat_thread.pk)] == ["user", "assistant"]


# --- the client goes or falls behind, the thread goes ----------------------------------------------------------------


async def test_client_gone_mid_stream_does_not_lose_the_answer(stream_client, chat_thread, settings):
    held = HeldModel(["Digits", " dance", " across", " the", " ledger."], released=2)
    settings.AGENT_MODEL = held.model()
    communicator, response = await stream_client.open(chat_thread.pk, "Write me a poem")
    assert response.status == 200
    await read_tokens(communicator, response, 2)

    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=TIMEOUT)

    # Still running when the client left: the model is held.
    assert [m.status for m in await messages_of(chat_thread.pk)] == ["complete", "in_progress"]
    held.release_all()
    answer = await settled_answer(chat_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    assert answer.content == held.text
    assert answer.lease_expires_at is None


async def test_stream_answers_when_its_client_goes_away_while_the_lease_is_being_taken(
    stream_client, chat_thread, monkeypatch
):
    loop, taking, may_take = asyncio.get_running_loop(), asyncio.Event(), threading.Event()
    real_begin = lease.run_begin

    def begin_once_allowed(**kwargs: Any) -> Any:
        loop.call_soon_threadsafe(taking.set)
        may_take.wait(timeout=TIMEOUT)
        return real_begin(**kwargs)

    monkeypatch.setattr(lease, "run_begin", begin_once_allowed)
    communicator = await stream_client.send(chat_thread.pk, "Write me a poem")
    await taking.wait()

    await communicator.send_input({"type": "http.disconnect"})
    may_take.set()
    await communicator.wait(timeout=TIMEOUT)

    answer = await settled_answer(chat_thread.pk)
    assert (answer.status, answer.lease_expires_at) == (Message.Status.COMPLETE, None)
    assert answer.content


LOOKUPS = 12
ADVICE = {"support_advice": "John, I looked twice.", "block_card": False, "risk_level": 0, "follow_up_actions": []}


async def many_lookups_then_advice(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[DeltaToolCalls]:
    """Looks the balance up LOOKUPS times at once (a tool_call and a tool_result event each), then answers."""
    latest = messages[-1]
    if isinstance(latest, ModelRequest) and any(isinstance(part, ToolReturnPart) for part in latest.parts):
        yield {0: DeltaToolCall(name=info.output_tools[0].name, json_args=json.dumps(ADVICE))}
        return
    arguments = json.dumps({"include_pending": False})
    yield {
        index: DeltaToolCall(name="customer_balance", json_args=arguments, tool_call_id=f"lookup-{index}")
        for index in range(LOOKUPS)
    }


async def test_listener_that_stops_reading_is_cut_off_while_the_run_completes(stream_client, support_thread, settings):
    # Twice the bound and more of events that cannot merge: the listener overflows, whenever it last took events.
    settings.STREAM_BACKLOG_EVENTS = 4
    settings.AGENT_MODEL = FunctionModel(stream_function=many_lookups_then_advice, model_name="lookups")
    reader = StalledReader()
    communicator, response = await stream_client.open(support_thread.pk, "What is my balance?", reader=reader)
    assert response.status == 200

    answer = await settled_answer(support_thread.pk)
    reader.resume()
    await read_to_end(communicator, response)

    assert "done" not in names(response.events())
    assert (answer.status, answer.output) == ("complete", ADVICE)
    assert answer.metadata["usage"]["tool_calls"] == LOOKUPS


@pytest.mark.parametrize(
    ("agent_type", "query"), [("bank_support", "What is my balance?"), ("general_chat", "What are your opening hours?")]
)
async def test_slow_listener_gets_fewer_merged_deltas_ending_at_the_saved_answer(
    stream_client, demo_customer, user_id, settings, agent_type, query
):
    settings.STREAM_BACKLOG_EVENTS = 8
    thread = await sync_to_async(Thread.objects.create)(user_id=user_id, agent_type=agent_type)
    demo = CountingDemoModel()
    settings.AGENT_MODEL = demo.model
    reader = StalledReader()
    communicator, response = await stream_client.open(thread.pk, query, reader=reader)

    # The listener reads nothing more until the answer is saved: every delta meanwhile waits in its backlog.
    answer = await settled_answer(thread.pk)
    reader.resume()
    await read_to_end(communicator, response)

    events = response.events()
    assert names(events)[-2:] == ["message_complete", "done"]
    deltas = tokens(events)
    # More chunks than the backlog holds: only merging kept the listener.
    assert demo.answer_chunks > settings.STREAM_BACKLOG_EVENTS
    assert 0 < len(deltas) < demo.answer_chunks
    if answer.output is not None:
        partials = [json.loads(delta) for delta in deltas]
        assert_partials_of(partials, answer.output)
        assert partials[-1] == answer.output
    else:
        assert "".join(deltas) == answer.content


async def test_thread_deleted_while_its_answer_streams_ends_with_not_found_then_done(
    stream_client, chat_thread, settings
):
    held = HeldModel(["Half", " an", " answer."])
    settings.AGENT_MODEL = held.model()
    communicator, response = await stream_client.open(chat_thread.pk, "Tell me something")
    await read_tokens(communicator, response, 1)

    await sync_to_async(Thread.objects.filter(pk=chat_thread.pk).delete)()
    held.release_all()
    await read_to_end(communicator, response)

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[-2:] == ["error", "done"]
    assert "message_complete" not in kinds
    assert events[-2]["error_type"] == "not_found"
    assert await message_count() == 0
    assert not await any_in_progress()


# --- the model, the database or the channel layer fails --------------------------------------------------------------


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
    assert answer.lease_expires_at is None


async def provider_times_out_mid_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    yield "The answer"
    raise ModelTimeoutError("held", "Read timed out")


async def never_answers(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    await asyncio.Event().wait()
    yield "never"


@pytest.mark.parametrize(
    "model",
    [
        FunctionModel(stream_function=provider_times_out_mid_stream, model_name="held"),
        # pydantic-ai's own deadline on a model that never answers.
        FunctionModel(
            stream_function=never_answers, model_name="held", settings=ModelSettings(first_event_timeout=0.05)
        ),
    ],
    ids=["provider_timeout", "first_event_timeout"],
)
async def test_model_timeout_ends_with_error_model_timeout_then_done(stream_client, chat_thread, settings, model):
    settings.AGENT_MODEL = model

    response = await stream_client.post(chat_thread.pk, "What is the answer?")

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[-2:] == ["error", "done"]
    assert "message_complete" not in kinds
    assert events[-2]["error_type"] == "model_timeout"
    _, answer = await messages_of(chat_thread.pk)
    assert (answer.status, answer.content) == ("failed", "".join(tokens(events)))
    assert answer.metadata["error"]["code"] == "model_timeout"


async def test_database_error_while_saving_the_answer_ends_with_error_then_done(
    stream_client, chat_thread, monkeypatch
):
    def database_down(**kwargs: Any) -> bool:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(lease, "run_finish", database_down)

    response = await stream_client.post(chat_thread.pk, "Hello")

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[-2:] == ["error", "done"]
    assert "message_complete" not in kinds
    assert events[-2]["error_type"] == "internal_error"
    assert "server closed" not in response.body.decode()


async def test_channel_layer_down_still_streams_every_event_to_the_caller(stream_client, support_thread, monkeypatch):
    layer = get_channel_layer()
    attempts = []

    async def down(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise ConnectionError("the channel layer is unreachable")

    monkeypatch.setattr(layer, "group_send", down)
    monkeypatch.setattr(layer, "group_add", down)

    response = await stream_client.post(support_thread.pk, "What is my balance?")

    assert response.status == 200
    events = response.events()
    kinds = names(events)
    assert kinds[:4] == ["message_created", "message_started", "tool_call", "tool_result"]
    assert kinds[-2:] == ["message_complete", "done"]
    assert kinds[4:-2] and set(kinds[4:-2]) == {"text_delta"}
    answer = await settled_answer(support_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    assert json.loads(tokens(events)[-1]) == answer.output
    assert attempts, "the layer was never tried: the fault was not injected"


# --- refused before anything runs ------------------------------------------------------------------------------------


async def assert_json_error(response: StreamResponse, status: int, code: str) -> None:
    assert response.status == status
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.json()["error"]["code"] == code
    assert await message_count() == 0


async def test_blank_query_is_422_and_writes_nothing(stream_client, chat_thread):
    response = await stream_client.post(chat_thread.pk, "   ")

    await assert_json_error(response, 422, "validation_error")


async def test_foreign_thread_is_404_and_writes_nothing(stream_client, other_user_id):
    foreign = await sync_to_async(Thread.objects.create)(user_id=other_user_id, agent_type="general_chat")

    response = await stream_client.post(foreign.pk, "Hello")

    await assert_json_error(response, 404, "not_found")


async def test_missing_api_key_is_401_and_writes_nothing(chat_thread, user_id):
    response = await StreamClient(api_key=None, user_id=user_id).post(chat_thread.pk, "Hello")

    await assert_json_error(response, 401, "not_authenticated")


async def test_run_concurrency_reached_is_503_overloaded_with_retry_after_and_writes_nothing(
    stream_client, chat_thread, user_id, settings
):
    settings.RUN_CONCURRENCY = 1
    held = HeldModel(["One", " at", " a", " time."])
    settings.AGENT_MODEL = held.model()
    other = await sync_to_async(Thread.objects.create)(user_id=user_id, agent_type="general_chat")
    communicator, first = await stream_client.open(chat_thread.pk, "Write me a poem")
    await read_tokens(communicator, first, 1)
    before = [(m.id, m.status, m.content) for m in await messages_of(chat_thread.pk)]

    refused = await stream_client.post(other.pk, "Hello")

    assert refused.status == 503
    assert refused.headers["content-type"].split(";")[0] == "application/json"
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert await messages_of(other.pk) == []
    assert [(m.id, m.status, m.content) for m in await messages_of(chat_thread.pk)] == before

    held.release_all()
    await read_to_end(communicator, first)
    # The slot went back with the run.
    again = await stream_client.post(other.pk, "Hello")
    assert again.status == 200
    assert names(again.events())[-2:] == ["message_complete", "done"]
