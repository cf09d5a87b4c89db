"""Two server processes on one Redis: a run in one streams to a socket on the other, and is cancelled from it.

Both servers the service supports run it: the production launcher (granian) and daphne.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from websockets.asyncio.client import connect

from identity.models import APIKey
from tests.conftest import DEMO_USER_ID
from threads.models import Message, Thread

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10  # seconds for any one event
SERVERS = ["granian", "daphne"]
"""The servers the service runs on: the production launcher (`python -m bankagent.serve`: granian), and daphne."""
STORY = ["Once", " upon", " a", " time,", " in", " a", " small", " town", " by", " the", " sea"]

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs REDIS_URL and PostgreSQL, which the processes share",
    ),
]


class HeldModelServer:
    """An OpenAI-compatible chat completions endpoint on the test's event loop, which the processes' model
    calls reach: it streams `words`, then holds the answer open until the test lets it end or the caller hangs
    up. The model is then mid-answer for as long as the test needs, in whichever process runs it."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.requests: list[dict] = []
        self.streamed = asyncio.Event()
        self.finish = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            self.requests.append(json.loads(await reader.readexactly(length)))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for word in self.words:
                await self._event(writer, {"role": "assistant", "content": word})
            self.streamed.set()
            finish, hang_up = asyncio.ensure_future(self.finish.wait()), asyncio.ensure_future(reader.read())
            await asyncio.wait([finish, hang_up], return_when=asyncio.FIRST_COMPLETED)
            finish.cancel()
            if hang_up.done():  # read() gives b"" once the caller has closed the connection
                self.hung_up.set()
                return
            hang_up.cancel()
            await self._event(writer, {}, finish_reason="stop")
            await self._chunk(writer, b"data: [DONE]\n\n")
            await self._chunk(writer, b"")
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()

    async def _event(self, writer: asyncio.StreamWriter, delta: dict, finish_reason: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o"}
        await self._chunk(writer, f"data: {json.dumps(chunk | {'choices': [choice]})}\n\n".encode())

    async def _chunk(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()


@pytest.fixture
async def model_server():
    held = HeldModelServer(STORY)
    held.server = await asyncio.start_server(held._serve, "127.0.0.1", 0)
    yield held
    held.finish.set()
    held.server.close()
    await held.server.wait_closed()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(server: str, port: int) -> list[str]:
    """How to start `server` on `port`; the production launcher with one worker a process."""
    if server == "granian":
        return [sys.executable, "-m", "bankagent.serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "bankagent.asgi:application"]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server on port {port} did not become healthy")


@pytest.fixture(params=SERVERS)
def servers(request, tmp_path, model_server):
    """Two processes of one server on the test database and the machine's Redis, their model the test's server."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_SECRET_KEY": "two-process-test",
        "DJANGO_DEBUG": "off",
        "AGENT_MODEL": "openai-chat:gpt-4o",
        "OPENAI_BASE_URL": model_server.url,
        "OPENAI_API_KEY": "not-a-real-key",
    }
    ports, processes = [free_port(), free_port()], []
    try:
        for port in ports:
            log = open(tmp_path / f"{request.param}-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            command = server_command(request.param, port)
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for port, process in zip(ports, processes, strict=True):
            wait_healthy(port, process)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


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


def shape(events: list[dict]) -> list[str]:
    """Event names, with a run of text_delta counted once (each process merges deltas as its readers lag)."""
    names: list[str] = []
    for event in events:
        if not (names and names[-1] == event["event"] == "text_delta"):
            names.append(event["event"])
    return names


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
        assert model_server.streamed.is_set() and not model_server.hung_up.is_set()

        await watcher.send(json.dumps({"type": "cancel"}))
        after_cancel = await next_event(watcher, "done")
        starter_events = await next_event(starter, "done")
        async with asyncio.timeout(TIMEOUT):
            await model_server.hung_up.wait()  # the run's process stopped the model call itself

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
    assert len(model_server.requests) == 1 and model_server.requests[0]["stream"] is True
