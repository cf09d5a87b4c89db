"""Two daphne processes on one Redis: a run in one streams to a socket on the other, and is cancelled from it."""

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

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs REDIS_URL and PostgreSQL, which the processes share",
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne on port {port} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"daphne on port {port} did not become healthy")


@pytest.fixture
def servers(tmp_path):
    """Two daphne processes on the test database and the machine's Redis."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_SECRET_KEY": "two-process-test",
        "DJANGO_DEBUG": "off",
        "AGENT_MODEL": "demo",
        "DEMO_MODEL_DELAY_MS": "40",
    }
    ports, processes = [free_port(), free_port()], []
    try:
        for port in ports:
            log = open(tmp_path / f"daphne-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "bankagent.asgi:application"]
            processes.append(subprocess.Popen(daphne, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for port, process in zip(ports, processes, strict=True):
            wait_healthy(port, process)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


async def next_event(ws, wanted: str, timeout: float = 10) -> list[dict]:
    """Events received up to and including the first `wanted` one."""
    seen = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        seen.append(event)
        if event["event"] == wanted:
            return seen


async def test_run_in_one_process_streams_to_and_is_cancelled_from_the_other(servers):
    first, second = servers
    _, key = await sync_to_async(APIKey.objects.create_key)(name="two processes")
    thread = await Thread.objects.acreate(user_id=DEMO_USER_ID, agent_type="general_chat")
    headers = {"X-API-Key": key, "X-User-ID": str(DEMO_USER_ID)}
    path = f"/ws/v1/threads/{thread.id}/"

    async with (
        connect(f"ws://127.0.0.1:{first}{path}", additional_headers=headers) as starter,
        connect(f"ws://127.0.0.1:{second}{path}", additional_headers=headers) as watcher,
    ):
        await starter.send(json.dumps({"type": "query", "query": "Tell me a story"}))
        # The watcher's process did not start the run: its events came through Redis.
        before_cancel = await next_event(watcher, "text_delta")
        assert [e["event"] for e in before_cancel[:2]] == ["message_created", "message_started"]
        message_id = before_cancel[1]["message_id"]

        cancelled_at = time.monotonic()
        await watcher.send(json.dumps({"type": "cancel"}))
        after_cancel = await next_event(watcher, "done")
        stopped_in = time.monotonic() - cancelled_at
        starter_events = await next_event(starter, "done")

    assert [e["event"] for e in after_cancel[-2:]] == ["message_complete", "done"]
    assert stopped_in < 2, f"the run took {stopped_in:.1f}s to stop"
    assert [e["event"] for e in starter_events] == [e["event"] for e in before_cancel + after_cancel]
    answer = await Message.objects.aget(pk=message_id)
    assert answer.status == Message.Status.INCOMPLETE
    assert 0 < len(answer.content) < 400, "the partial answer is saved, and it is not the whole story"
