"""Two server processes on one Redis: a run in one streams to a socket on the other, and is cancelled from it.

Both servers the service supports run it: the production launcher (granian) and daphne.
"""

import asyncio
import json
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from websockets.asyncio.client import connect

from identity.models import APIKey
from tests.conftest import DEMO_USER_ID
from tests.live import SERVERS, LiveServer, ModelServer, request, server_env, shape
from threads.models import Message, Thread

TIMEOUT = 10  # seconds for any one event
STORY = ["Once", " upon", " a", " time,", " in", " a", " small", " town", " by", " the", " sea"]

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs REDIS_URL and PostgreSQL, which the processes share",
    ),
]


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """The processes' model: it streams the story, then holds the answer open until released or hung up on."""
    held = ModelServer(STORY).start()
    held.hold()
    yield held
    held.stop()


@pytest.fixture(params=SERVERS)
def servers(request, tmp_path, model_server) -> Iterator[list[int]]:
    """Two processes of one server on the test database and the machine's Redis, their model the test's server."""
    env = server_env(REDIS_URL=settings.REDIS_URL, DJANGO_SECRET_KEY="two-process-test", **model_server.env())
    started = [LiveServer(request.param, env, tmp_path / f"{request.param}-{n}.log") for n in range(2)]
    try:
        for server in started:
            server.start(healthy=True)
        yield [server.port for server in started]
    finally:
        for server in started:
            server.stop()


async def next_event(ws, wanted: str) -> list[dict]:
    """Events received up to and including the first `wanted` one."""
    seen = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        seen.append(event)
        if event["event"] == wanted:
            return seen


async def events_until_text(ws, text: str) -> list[dict]:
    """Events received until their deltas add up to `text` (deltas may arrive merged)."""
    seen = []
    while text_of(seen) != text:
        seen.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
        assert seen[-1]["event"] != "done", seen
    return seen


def text_of(events: list[dict]) -> str:
    return "".join(event["token"] for event in events if event["event"] == "text_delta")


async def test_run_in_one_process_streams_to_and_is_cancelled_from_the_other(servers, model_server):
    first, second = servers
    _, key = await sync_to_async(APIKey.objects.create_key)(name="two processes")
    thread = await Thread.objects.acreate(user_id=DEMO_USER_ID, agent_type="general_chat")
    headers = {"X-API-Key": key, "X-User-ID": str(DEMO_USER_ID)}
    path = f"/ws/v1/threads/{thread.id}/"
    said = "".join(STORY)

    async with (
        connect(f"ws://127.0.0.1:{first}{path}", additional_headers=headers) as starter,
        connect(f"ws://127.0.0.1:{second}{path}", additional_headers=headers) as watcher,
    ):
        await starter.send(json.dumps({"type": "query", "query": "Tell me a story"}))
        # The watcher's process did not start the run: all the model has said so far came through Redis.
        before_cancel = await events_until_text(watcher, said)
        (call,) = model_server.calls
        assert not call.hung_up.is_set()

        await watcher.send(json.dumps({"type": "cancel"}))
        after_cancel = await next_event(watcher, "done")
        starter_events = await next_event(starter, "done")
        # The run's process stopped the model call itself.
        assert await asyncio.to_thread(call.hung_up.wait, TIMEOUT)

    watcher_events = before_cancel + after_cancel
    assert shape(watcher_events) == ["message_created", "message_started", "text_delta", "message_complete", "done"]
    assert shape(starter_events) == shape(watcher_events)
    assert text_of(starter_events) == text_of(watcher_events) == said
    # Both processes' sockets got the same run: its messages, and how it ended.
    for index in (0, 1, -2, -1):
        assert starter_events[index] == watcher_events[index]
    complete = watcher_events[-2]
    answer = await Message.objects.aget(pk=watcher_events[1]["message_id"])
    assert (complete["status"], complete["content"]) == ("incomplete", said)
    assert (answer.status, answer.content) == (Message.Status.INCOMPLETE, said)
    assert len(model_server.calls) == 1 and call.body["stream"] is True


async def test_a_run_in_one_process_is_resumed_through_the_other_over_a_socket_and_over_http(servers, model_server):
    first, second = servers
    _, key = await sync_to_async(APIKey.objects.create_key)(name="two processes")
    thread = await Thread.objects.acreate(user_id=DEMO_USER_ID, agent_type="general_chat")
    headers = {"X-API-Key": key, "X-User-ID": str(DEMO_USER_ID)}
    said = "".join(STORY)

    async with connect(f"ws://127.0.0.1:{first}/ws/v1/threads/{thread.id}/", additional_headers=headers) as starter:
        await starter.send(json.dumps({"type": "query", "query": "Tell me a story"}))
        heard = await events_until_text(starter, said)  # the model holds its answer open after these words
        message_id, after = heard[1]["message_id"], heard[2]["seq"]  # the first delta had, the rest missed
        path = f"/ws/v1/threads/{thread.id}/?resume={message_id}&after={after}"
        async with connect(f"ws://127.0.0.1:{second}{path}", additional_headers=headers) as resumed:
            missed = await events_until_text(resumed, said[len(heard[2]["token"]) :])
            http = asyncio.create_task(
                asyncio.to_thread(
                    request,
                    second,
                    "GET",
                    f"/api/v1/threads/{thread.id}/runs/{message_id}/events?after={after}",
                    headers,
                )
            )
            model_server.release()
            rest = await next_event(resumed, "done")
            followed = await http
        await next_event(starter, "done")

    answer = await Message.objects.aget(pk=message_id)
    every = heard[:3] + missed + rest
    assert [event["seq"] for event in every] == sorted({event["seq"] for event in every})
    assert text_of(every) == answer.content == said
    assert every[-2]["event"] == "message_complete" and every[-1]["event"] == "done"
    over_http = [json.loads(line) for line in followed.body.splitlines()]
    assert followed.status == 200
    assert over_http[0]["seq"] == after + 1 and over_http[-1]["event"] == "done"
    assert text_of(heard[:3] + over_http) == said
