"""A client of the service this one replaced, unchanged, streams from POST /api/v1/agent/stream with a legacy key.

`parse_event_chunk` and its models below are the original client's parser (EmpoweredHouse/pydantic-ai-agent,
`src/service/models/api/stream_models.py`), and `parsed_stream` its `ApiClient.stream_agent_query` line handling:
the NDJSON body as it arrives, split on newlines, each non-empty line `json.loads`-ed and parsed. It knows exactly
the events of the original service, so it works only when the key's dialect speaks them.
"""

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from enum import Enum

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from pydantic import BaseModel

from bankagent.asgi import application
from identity.models import APIKey
from runs import runner
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 20.0


# --- the original client's parser ------------------------------------------------------------------------------------


class MessageRole(str, Enum):  # noqa: UP042 (declared so by the original client)
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    TOOL = "tool"


class EventType(Enum):
    THREAD_CREATED = "thread_created"
    MESSAGE_CREATED = "message_created"
    MESSAGE_STARTED = "message_started"
    MESSAGE_CHUNK = "message_chunk"
    TOKEN = "token"
    MESSAGE_COMPLETE = "message_complete"
    CONTENT = "content"
    ERROR = "error"
    DONE = "done"


class StreamMessageInfo(BaseModel):
    id: uuid.UUID
    role: MessageRole


class ThreadCreatedChunk(BaseModel):
    event: EventType = EventType.THREAD_CREATED
    thread_id: uuid.UUID


class MessageCreatedChunk(BaseModel):
    event: EventType = EventType.MESSAGE_CREATED
    message: StreamMessageInfo


class MessageStartedChunk(BaseModel):
    event: EventType = EventType.MESSAGE_STARTED
    message_id: uuid.UUID


class MessageChunk(BaseModel):
    event: EventType = EventType.MESSAGE_CHUNK
    message_id: uuid.UUID
    content: str


class TextDeltaChunk(BaseModel):
    event: EventType = EventType.TOKEN
    message_id: uuid.UUID
    token: str


class MessageCompleteChunk(BaseModel):
    event: EventType = EventType.MESSAGE_COMPLETE
    message_id: uuid.UUID


class ContentChunk(BaseModel):
    event: EventType = EventType.CONTENT
    delta: str


class ErrorChunk(BaseModel):
    event: EventType = EventType.ERROR
    error: str
    error_type: str


class DoneChunk(BaseModel):
    event: EventType = EventType.DONE


AgentResponseChunk = (
    ThreadCreatedChunk
    | MessageCreatedChunk
    | MessageStartedChunk
    | TextDeltaChunk
    | MessageChunk
    | MessageCompleteChunk
    | ContentChunk
    | ErrorChunk
    | DoneChunk
)

_CHUNK_MODELS: dict[str, type[BaseModel]] = {
    EventType.THREAD_CREATED.value: ThreadCreatedChunk,
    EventType.MESSAGE_CREATED.value: MessageCreatedChunk,
    EventType.MESSAGE_STARTED.value: MessageStartedChunk,
    EventType.MESSAGE_CHUNK.value: MessageChunk,
    EventType.TOKEN.value: TextDeltaChunk,
    EventType.MESSAGE_COMPLETE.value: MessageCompleteChunk,
    EventType.CONTENT.value: ContentChunk,
    EventType.ERROR.value: ErrorChunk,
    EventType.DONE.value: DoneChunk,
}


def parse_event_chunk(data: dict) -> AgentResponseChunk:
    event_type = data.get("event", "")
    model = _CHUNK_MODELS.get(event_type)
    if model is None:
        raise ValueError(f"Unknown event type: {event_type}")
    return model.model_validate(data)


async def parsed_stream(body: AsyncIterator[str], seen: list[dict] | None = None) -> AsyncIterator[AgentResponseChunk]:
    """The original client's reading of a stream: complete lines as they arrive, then whatever is left. (`seen` gets
    each line's object too, for the test.)"""
    buffer = ""
    async for text in body:
        buffer += text
        if "\n" in buffer:
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.strip():
                    data = json.loads(line)
                    if seen is not None:
                        seen.append(data)
                    yield parse_event_chunk(data)
    if buffer.strip():
        yield parse_event_chunk(json.loads(buffer))


# --- the endpoint, through the ASGI application ----------------------------------------------------------------------


async def stream_body(*, api_key: str, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> AsyncIterator[str]:
    """POST /api/v1/agent/stream; the 200 response's body as it arrives, decoded."""
    body = json.dumps({"thread_id": str(thread_id), "query": query}).encode()
    headers = [
        (b"host", b"localhost"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-api-key", api_key.encode()),
        (b"x-user-id", str(user_id).encode()),
    ]
    path = "/api/v1/agent/stream"
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("localhost", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await communicator.receive_output(timeout=TIMEOUT)
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    more = True
    try:
        while more:
            message = await communicator.receive_output(timeout=TIMEOUT)
            assert message["type"] == "http.response.body"
            more = message.get("more_body", False)
            yield message.get("body", b"").decode()
    finally:
        if more:
            # A client that gives up early goes away, as the original client does when its `stream()` block ends.
            await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(timeout=TIMEOUT)


# --- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def _no_run_left_behind(settings, transactional_db):
    """A channel layer of this test's own event loop; no run may outlive the test and write during the flush."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    yield
    runs = set(runner._RUNS)
    if runs:
        _, pending = await asyncio.wait(runs, timeout=TIMEOUT)
        for run in pending:
            run.cancel()
        assert not pending, "a run was still going when its test ended"


@pytest.fixture
def legacy_key(transactional_db) -> str:
    _, key = APIKey.objects.create_key(name="original client", events=APIKey.Events.LEGACY)
    return key


@pytest.fixture
def standard_key(transactional_db) -> str:
    _, key = APIKey.objects.create_key(name="current client")
    return key


@pytest.fixture
def support_thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


async def runs_finished() -> None:
    """Wait until every run started so far has ended, its answer saved."""
    if runs := set(runner._RUNS):
        _, pending = await asyncio.wait(runs, timeout=TIMEOUT)
        assert not pending, "a run did not end"


@sync_to_async
def saved_answer(thread_id: uuid.UUID) -> Message:
    return Message.objects.filter(thread_id=thread_id, role=Message.Role.ASSISTANT).latest("seq")


# --- the tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["What is my balance?", "Hello"])
async def test_original_client_parses_every_line_of_a_legacy_key_stream(legacy_key, user_id, support_thread, query):
    body = stream_body(api_key=legacy_key, user_id=user_id, thread_id=support_thread.pk, query=query)

    seen: list[dict] = []
    async with aclosing(body):
        chunks = [chunk async for chunk in parsed_stream(body, seen)]

    await runs_finished()
    answer = await saved_answer(support_thread.pk)
    assert answer.status == Message.Status.COMPLETE
    # Each event carries its seq, as in the standard dialect; those of the tool events it leaves out are missing.
    seqs = [event["seq"] for event in seen]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    assert len(seqs) < seqs[-1] if query == "What is my balance?" else len(seqs) == seqs[-1]
    assert isinstance(chunks[0], MessageCreatedChunk) and chunks[0].message.role is MessageRole.USER
    assert chunks[1] == MessageStartedChunk(message_id=answer.id)
    assert chunks[-2:] == [MessageCompleteChunk(message_id=answer.id), DoneChunk()]
    deltas = chunks[2:-2]
    assert deltas and all(isinstance(chunk, TextDeltaChunk) and chunk.message_id == answer.id for chunk in deltas)
    assert json.loads(deltas[-1].token) == answer.output


async def test_original_client_fails_on_a_standard_key_stream(standard_key, user_id, support_thread):
    body = stream_body(api_key=standard_key, user_id=user_id, thread_id=support_thread.pk, query="Hello")

    async with aclosing(body):
        with pytest.raises(ValueError, match=r"^Unknown event type: text_delta$"):
            async for _ in parsed_stream(body):
                pass

    # The client went away; the run went on and saved its answer.
    await runs_finished()
    assert (await saved_answer(support_thread.pk)).status == Message.Status.COMPLETE


async def test_original_client_parses_a_stream_that_stops_for_the_customers_approval(
    legacy_key, user_id, support_thread
):
    body = stream_body(api_key=legacy_key, user_id=user_id, thread_id=support_thread.pk, query="I lost my card")

    async with aclosing(body):
        chunks = [chunk async for chunk in parsed_stream(body)]

    await runs_finished()
    answer = await saved_answer(support_thread.pk)
    assert answer.status == Message.Status.AWAITING_APPROVAL
    # The approval events are left out, as tool events are: the client hears the answer end, empty.
    assert [type(chunk) for chunk in chunks] == [
        MessageCreatedChunk,
        MessageStartedChunk,
        MessageCompleteChunk,
        DoneChunk,
    ]
