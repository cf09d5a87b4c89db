"""Redis brown-outs, with a Redis server of the test's own: stopped (SIGSTOP), it accepts connections and never
answers, as a Redis that hangs does; continued, or restarted on its port, it answers again.

Every call that needs it fails within its timeout with the contract's error, nothing waits on it holding a run slot,
and once it answers again everything works without a restart: in a process's hub, and in a live server.
"""

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runs import hub as hub_module
from runs.hub import Hub, LocalRun
from runs.lease import open_run, question, release
from runs.limits import slots
from tests.conftest import Caller, close_hubs, pubsub_layer
from tests.live import TIMEOUT, LiveServer, free_port, request, server_env
from threads.models import Thread

REDIS_SERVER = shutil.which("redis-server")
HANG_GUARD = 4 * TIMEOUT
"""Past this a call is taken to hang: every call here is bounded far below it."""

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server to stop and start a Redis of its own")


class PrivateRedis:
    """A Redis server process of the test's own, on a free port, keeping nothing on disk."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / f"redis-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not self.answers():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.02)

    def answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
            probe.sendall(b"PING\r\n")
            return probe.recv(16).startswith(b"+PONG")
        return False

    def hang(self) -> None:
        """Accept connections and answer nothing, as a Redis in a brown-out does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # a stopped process dies of SIGKILL as well
            self.process.wait(timeout=TIMEOUT)
            self.process = None


@pytest.fixture
def redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class Reader:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.arrived = asyncio.Event()

    def deliver(self, events: list[dict]) -> None:
        self.events.extend(events)
        self.arrived.set()


async def heard(watching: Hub, publishing: Hub, thread_id: uuid.UUID, reader: Reader) -> None:
    """Publish markers of one run from `publishing` until `reader`, on `watching`, hears one: Redis has the
    subscription again once it does."""
    async with asyncio.timeout(HANG_GUARD):
        while not reader.events:
            reader.arrived.clear()
            with contextlib.suppress(Exception):  # a connection of the publisher that Redis dropped is made again
                await publishing.publish_elsewhere(thread_id, 2, [{"event": "marker"}])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.arrived.wait(), 0.2)


async def reaches(hub: Hub, canceller: Hub, thread_id: uuid.UUID) -> None:
    """A cancel from `canceller` stops a run registered on `hub`."""
    stopped = asyncio.Event()
    run = LocalRun(thread_id=thread_id, received_at=0.0, on_stop=stopped.set)
    hub.register(run)
    try:
        async with asyncio.timeout(HANG_GUARD):
            while not stopped.is_set():
                with contextlib.suppress(Exception):
                    await canceller.cancel(thread_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), 0.2)
    finally:
        hub.unregister(run)


# A process's hub


async def test_a_hub_on_a_redis_that_hangs_fails_each_call_in_time_and_works_again_once_it_answers(redis):
    hub, other = Hub(pubsub_layer(redis.url)), Hub(pubsub_layer(redis.url))
    thread_id = uuid.uuid4()
    try:
        redis.hang()
        async with asyncio.timeout(HANG_GUARD):
            watched = await asyncio.gather(
                hub.watch(thread_id, Reader()), hub.watch(uuid.uuid4(), Reader()), return_exceptions=True
            )
            with pytest.raises(Exception):  # noqa: B017 - a timeout, or Redis's own error: either way, in time
                await hub.cancel(thread_id)
            with pytest.raises(Exception):  # noqa: B017
                await hub.ping(2)
            await hub.listen_for_cancels()  # waits a moment, then lets runs start without
        assert all(isinstance(outcome, Exception) for outcome in watched), watched
        assert not hub.readers and not hub.cancels_joined

        redis.resume()
        reader = Reader()
        async with asyncio.timeout(HANG_GUARD):
            await hub.watch(thread_id, reader)
            await hub.ping(TIMEOUT)
            await heard(hub, other, thread_id, reader)
            while not hub.cancels_joined:  # joining the cancels group goes on in the background
                await asyncio.sleep(0.05)
            await reaches(hub, other, uuid.uuid4())
    finally:
        redis.resume()
        await close_hubs(hub, other)


async def test_a_hub_whose_redis_restarts_hears_its_threads_and_cancels_again_without_a_restart(redis):
    hub, other = Hub(pubsub_layer(redis.url)), Hub(pubsub_layer(redis.url))
    thread_id, reader = uuid.uuid4(), Reader()
    try:
        async with asyncio.timeout(HANG_GUARD):
            await hub.watch(thread_id, reader)
            await hub.listen_for_cancels()
            await heard(hub, other, thread_id, reader)

        redis.stop()  # Redis keeps nothing: its subscriptions are gone with it
        redis.start()
        reader.events.clear()

        await heard(hub, other, thread_id, reader)
        await reaches(hub, other, uuid.uuid4())
    finally:
        await close_hubs(hub, other)


@pytest.mark.django_db(transaction=True)
async def test_a_run_starts_while_redis_hangs_and_holds_no_slot_while_it_waits_for_it(redis, settings, make_thread):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": redis.url, **settings.REDIS_TIMEOUTS}]},
        }
    }
    thread = await sync_to_async(make_thread)(agent_type="general_chat")
    taken = slots.taken
    redis.hang()
    try:
        take = question(user_id=thread.user_id, thread_id=thread.pk, query="Hello")
        opening = asyncio.ensure_future(open_run(thread_id=thread.pk, take=take))
        async with asyncio.timeout(HANG_GUARD):
            while hub_module.hub()._joining_cancels is None:  # it waits for this process to join the cancels group
                await asyncio.sleep(0)
            assert slots.taken == taken and not opening.done()
            run = await opening
        assert slots.taken == taken + 1
        release(run)
    finally:
        redis.resume()
        await close_hubs(hub_module.hub())


# A live server


@pytest.fixture
def caller_thread(caller) -> Thread:
    return Thread.objects.create(user_id=caller.user_id, agent_type="general_chat")


@pytest.fixture
def served(redis, tmp_path, transactional_db) -> Iterator[LiveServer]:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL, which the server process shares with the tests")
    server = LiveServer(
        "granian", server_env(REDIS_URL=redis.url, THROTTLE_RATES="key=6000/min"), tmp_path / "granian.log"
    )
    server.start(healthy=True)
    yield server
    redis.resume()
    server.stop()


def refused(server: LiveServer, thread: Thread, caller: Caller) -> tuple[list[dict], int]:
    """The events a new socket gets before the server closes it, and its close code."""
    events: list[dict] = []
    with connect(server.ws_url(thread), additional_headers=caller.headers, proxy=None) as ws:
        try:
            while True:
                events.append(json.loads(ws.recv(timeout=HANG_GUARD)))
        except ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd else 1006


def pong(server: LiveServer, thread: Thread, caller: Caller) -> dict:
    with connect(server.ws_url(thread), additional_headers=caller.headers, proxy=None) as ws:
        ws.send(json.dumps({"type": "ping"}))
        return json.loads(ws.recv(timeout=HANG_GUARD))


def thread_only(thread: Thread) -> dict:
    return {"thread_id": str(thread.pk)}


def next_error(ws) -> dict:
    while (event := json.loads(ws.recv(timeout=HANG_GUARD)))["event"] != "error":
        pass
    return event


def events_until_done(ws) -> list[dict]:
    events = []
    while not events or events[-1]["event"] != "done":
        events.append(json.loads(ws.recv(timeout=HANG_GUARD)))
    return events


def test_a_live_server_on_a_redis_that_hangs_answers_every_call_in_time_and_recovers(
    served, redis, caller, caller_thread
):
    query = {"thread_id": str(caller_thread.pk), "query": "Hello"}
    with connect(served.ws_url(caller_thread), additional_headers=caller.headers, proxy=None) as opened_before:
        redis.hang()

        health = request(served.port, "GET", "/api/v1/health")
        answered = request(served.port, "POST", "/api/v1/agent/query", caller.headers, query)
        streamed = request(served.port, "POST", "/api/v1/agent/stream", caller.headers, query)
        ticket = request(
            served.port, "POST", "/api/v1/ws-tickets", caller.headers, {"thread_id": str(caller_thread.pk)}
        )
        # A thread this process hears already needs no Redis to be watched; another does.
        unwatched = Thread.objects.create(user_id=caller.user_id, agent_type="general_chat")
        refusal, refused_code = refused(served, unwatched, caller)
        opened_before.send(json.dumps({"type": "cancel"}))
        cancel_error = next_error(opened_before)  # after the events of the runs above
        opened_before.send(json.dumps({"type": "query", "query": "Still there?"}))
        own_run = events_until_done(opened_before)

        redis.resume()

    assert health.status == 503
    assert json.loads(health.body)["channel_layer"] == "error"
    assert answered.status == 200 and json.loads(answered.body)["status"] == "complete", answered.body
    assert streamed.status == 200
    assert [json.loads(line)["event"] for line in streamed.body.splitlines()][-2:] == ["message_complete", "done"]
    assert ticket.status == 503 and json.loads(ticket.body)["error"]["code"] == "service_unavailable"
    assert refused_code == 1013
    assert [(event["event"], event["error_type"]) for event in refusal] == [("error", "service_unavailable")]
    assert (cancel_error["event"], cancel_error["error_type"]) == ("error", "service_unavailable")
    assert [event["event"] for event in own_run][-2:] == ["message_complete", "done"]

    deadline = time.monotonic() + HANG_GUARD
    while request(served.port, "GET", "/api/v1/health").status != 200:
        assert time.monotonic() < deadline, served.log_tail()
        time.sleep(0.1)
    assert pong(served, unwatched, caller) == {"event": "pong"}
    with connect(served.ws_url(caller_thread), additional_headers=caller.headers, proxy=None) as ws:
        ws.send(json.dumps({"type": "cancel"}))  # nothing runs: nothing happens, no error
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=HANG_GUARD)) == {"event": "pong"}
    assert (
        request(served.port, "POST", "/api/v1/ws-tickets", caller.headers, {"thread_id": str(caller_thread.pk)}).status
        == 201
    )
