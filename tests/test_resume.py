"""Resuming a run (runs.eventlog, runs.resume): every event of a run carries `seq`; a client that lost some gets them
again, over a new socket, on its open socket, or over HTTP, each once and in order, then the live ones.

Runs here are held by the test (`HeldModel`): the test chooses where a run stands when a client goes or comes back.
Whether the events come from this process's log or from Redis, each must arrive once.
"""

import asyncio
import itertools
import json
import uuid

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator, WebsocketCommunicator
from django.conf import settings

from bankagent.asgi import application
from identity.models import APIKey
from runs import eventlog, resume
from tests.conftest import finished_turn
from tests.test_streaming_http import HeldModel, StreamResponse, read_chunk, read_to_end
from threads.models import Message, Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runs_end_with_the_test")]

TIMEOUT = 20.0
WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " card"]


@pytest.fixture
def key(transactional_db) -> str:
    return APIKey.objects.create_key(name="resume tests")[1]


@pytest.fixture
def thread(transactional_db, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="general_chat")


@pytest.fixture
def held(settings) -> HeldModel:
    model = HeldModel(WORDS, released=3)
    settings.AGENT_MODEL = model.model()
    return model


def headers(key: str, user_id: uuid.UUID) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"localhost"), (b"x-api-key", key.encode()), (b"x-user-id", str(user_id).encode())]


async def opened(thread: Thread, key: str, query: str = "") -> WebsocketCommunicator:
    ws = WebsocketCommunicator(application, f"/ws/v1/threads/{thread.pk}/{query}", headers=headers(key, thread.user_id))
    connected, _ = await ws.connect(timeout=TIMEOUT)
    assert connected
    return ws


async def until(ws: WebsocketCommunicator, done: callable) -> list[dict]:
    """Events received until `done(events)` holds."""
    events: list[dict] = []
    while not done(events):
        events.append(await ws.receive_json_from(timeout=TIMEOUT))
    return events


def deltas(count: int) -> callable:
    return lambda events: sum(event["event"] == "text_delta" for event in events) >= count


def upto(seq: int) -> callable:
    return lambda events: bool(events) and events[-1]["seq"] >= seq


def assert_each_once(events: list[dict], first: int = 1) -> None:
    """Seqs from `first` up, none twice, none lost: a delta that stands for several (merged for a reader that was
    behind) carries the last one's seq, so only a delta may follow a gap."""
    seqs = [event["seq"] for event in events]
    assert seqs[0] == first and seqs == sorted(set(seqs)), seqs
    for earlier, later in itertools.pairwise(events):
        assert later["seq"] == earlier["seq"] + 1 or later["event"] == "text_delta", (earlier, later)


def ended(events: list[dict]) -> bool:
    return bool(events) and events[-1]["event"] == "done"


async def pong(ws: WebsocketCommunicator) -> dict:
    await ws.send_json_to({"type": "ping"})
    return await ws.receive_json_from(timeout=TIMEOUT)


def text_of(events: list[dict]) -> str:
    return "".join(event["token"] for event in events if event["event"] == "text_delta")


async def answer_of(thread: Thread) -> Message:
    return await Message.objects.filter(thread=thread, role="assistant").alatest("seq")


async def produced(held: HeldModel, count: int) -> None:
    """Until the model has streamed `count` chunks."""
    async with asyncio.timeout(TIMEOUT):
        while held.produced < count:
            await asyncio.sleep(0.01)


async def expire(message_id: str) -> None:
    """The run's log expires, here and in Redis: as RUN_EVENTS_TTL_SECONDS after its end would."""
    eventlog.local_log.runs.pop(message_id, None)
    eventlog.local_log.ended.pop(message_id, None)
    if settings.REDIS_URL:
        await sync_to_async(redis.Redis.from_url(settings.REDIS_URL).delete)(f"bankagent:run-events:{message_id}")


async def get_events(thread: Thread, key: str, message_id: object, query: str = "") -> StreamResponse:
    path = f"/api/v1/threads/{thread.pk}/runs/{message_id}/events"
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": headers(key, thread.user_id),
        "client": ("127.0.0.1", 40000),
        "server": ("localhost", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(timeout=TIMEOUT)
    response = StreamResponse(status=start["status"], headers=dict(start.get("headers", [])))
    response.communicator = communicator
    return response


# Every event of a run carries seq


async def test_every_event_of_a_run_carries_its_answer_and_its_seq_from_1(thread, key):
    ws = await opened(thread, key)
    await ws.send_json_to({"type": "query", "query": "Write me a poem"})
    events = await until(ws, ended)
    await ws.disconnect()

    answer = await answer_of(thread)
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert {event["message_id"] for event in events} == {str(answer.pk)}
    assert events[0]["message"]["role"] == "user"  # message_created still names the question too


# Over a new socket


async def test_a_socket_dropped_mid_answer_resumes_on_a_new_one_with_every_event_once(thread, key, held):
    first = await opened(thread, key)
    await first.send_json_to({"type": "query", "query": "Tell me a story"})
    before = await until(first, deltas(3))
    await first.disconnect()
    held.release(2)  # said while nobody listened
    await produced(held, 5)

    again = await opened(thread, key, f"?resume={before[-1]['message_id']}&after={before[-1]['seq']}")
    missed = await until(again, lambda events: text_of(events) == "".join(WORDS[3:5]))
    held.release_all()
    after = missed + await until(again, ended)
    await again.disconnect()

    every = before + after
    assert_each_once(every)
    answer = await answer_of(thread)
    assert text_of(every) == answer.content == held.text
    assert every[-2]["event"] == "message_complete" and every[-2]["content"] == held.text


async def test_a_run_that_ended_replays_to_its_done(thread, key, held):
    first = await opened(thread, key)
    await first.send_json_to({"type": "query", "query": "Tell me a story"})
    held.release_all()
    live = await until(first, ended)
    await first.disconnect()

    again = await opened(thread, key, f"?resume={live[0]['message_id']}&after=0")
    replayed = await until(again, ended)
    await again.disconnect()

    assert_each_once(replayed)
    assert text_of(replayed) == text_of(live) == held.text
    assert replayed[:2] == live[:2] and replayed[-2:] == live[-2:]


# On an open socket


async def test_a_resume_frame_sends_what_the_socket_missed_and_nothing_it_had(thread, key, held):
    watcher, asker = await opened(thread, key), await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    had = await until(watcher, deltas(3))
    message_id = had[-1]["message_id"]

    # Asked from before what it had: it gets only what it did not have.
    await watcher.send_json_to({"type": "resume", "message_id": message_id, "after": 1})
    assert (await pong(watcher)) == {"event": "pong"}
    held.release_all()
    rest = await until(watcher, ended)
    await until(asker, ended)
    await watcher.disconnect()
    await asker.disconnect()

    every = had + rest
    assert_each_once(every)


async def test_a_second_socket_joins_a_live_answer_from_its_beginning(thread, key, held):
    asker = await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    seen = await until(asker, deltas(3))

    joiner = await opened(thread, key)
    await joiner.send_json_to({"type": "resume", "message_id": seen[0]["message_id"], "after": 0})
    caught_up = await until(joiner, upto(seen[-1]["seq"]))
    held.release_all()
    joined = caught_up + await until(joiner, ended)
    await until(asker, ended)
    await joiner.disconnect()
    await asker.disconnect()

    assert_each_once(joined)
    assert text_of(joined) == held.text


async def test_an_expired_log_is_resume_expired_and_the_socket_stays_usable(thread, key, user_id):
    _, answer = await sync_to_async(finished_turn)(thread)
    await expire(str(answer.pk))
    ws = await opened(thread, key)

    await ws.send_json_to({"type": "resume", "message_id": str(answer.pk), "after": 3})
    expired = await ws.receive_json_from(timeout=TIMEOUT)

    assert (expired["event"], expired["error_type"], expired["message_id"]) == (
        "error",
        "resume_expired",
        str(answer.pk),
    )
    assert await pong(ws) == {"event": "pong"}
    await ws.disconnect()


@pytest.mark.parametrize(
    ("point", "code"),
    [
        ({"message_id": "the question", "after": 0}, "not_found"),
        ({"message_id": str(uuid.uuid4()), "after": 0}, "not_found"),
        ({"message_id": "another thread's", "after": 0}, "not_found"),
        ({"message_id": "another user's", "after": 0}, "not_found"),
        ({"message_id": "not-a-uuid", "after": 0}, "not_found"),
        ({"message_id": "the answer", "after": -1}, "invalid_resume"),
        ({"message_id": "the answer", "after": "x"}, "invalid_resume"),
        ({"message_id": "the answer", "after": 1.5}, "invalid_resume"),
        ({"message_id": "the answer", "after": True}, "invalid_resume"),
        ({"message_id": "the answer"}, "invalid_resume"),
    ],
)
async def test_a_bad_resume_is_an_error_event_and_the_socket_stays_usable(thread, key, other_user_id, point, code):
    question, answer = await sync_to_async(finished_turn)(thread)
    other = await Thread.objects.acreate(user_id=thread.user_id, agent_type="general_chat")
    _, other_answer = await sync_to_async(finished_turn)(other)
    foreign = await Thread.objects.acreate(user_id=other_user_id, agent_type="general_chat")
    _, foreign_answer = await sync_to_async(finished_turn)(foreign)
    names = {
        "the question": str(question.pk),
        "the answer": str(answer.pk),
        "another thread's": str(other_answer.pk),
        "another user's": str(foreign_answer.pk),
    }
    frame = {"type": "resume", **point, "message_id": names.get(point["message_id"], point["message_id"])}
    ws = await opened(thread, key)

    await ws.send_json_to({**frame, "request_id": "r1"})
    refused = await ws.receive_json_from(timeout=TIMEOUT)

    assert (refused["event"], refused["error_type"], refused["request_id"]) == ("error", code, "r1")
    assert await pong(ws) == {"event": "pong"}
    await ws.disconnect()


async def test_a_bad_resume_at_the_handshake_is_an_error_event_on_an_open_socket(thread, key):
    ws = await opened(thread, key, "?resume=not-a-run&after=0")

    refused = await ws.receive_json_from(timeout=TIMEOUT)

    assert (refused["event"], refused["error_type"]) == ("error", "not_found")
    assert await pong(ws) == {"event": "pong"}
    await ws.disconnect()


# Over HTTP


async def test_http_resume_streams_the_missed_events_then_the_live_ones_to_done(thread, key, held):
    asker = await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    had = await until(asker, deltas(3))

    response = await get_events(thread, key, had[-1]["message_id"], f"after={had[2]['seq']}")
    assert response.status == 200
    assert await read_chunk(response.communicator, response)
    held.release_all()
    await read_to_end(response.communicator, response)
    await until(asker, ended)
    await asker.disconnect()

    resumed = response.events()
    assert_each_once(resumed, first=had[2]["seq"] + 1)
    assert resumed[-1]["event"] == "done"
    assert text_of(had[:3] + resumed) == held.text


async def test_http_resume_of_an_ended_run_replays_it_and_from_its_last_event_sends_nothing(thread, key, held):
    held.release_all()
    asker = await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    live = await until(asker, ended)
    await asker.disconnect()

    whole = await get_events(thread, key, live[0]["message_id"])
    await read_to_end(whole.communicator, whole)
    nothing = await get_events(thread, key, live[0]["message_id"], f"after={live[-1]['seq']}")
    await read_to_end(nothing.communicator, nothing)

    assert whole.status == 200
    assert_each_once(whole.events())
    assert text_of(whole.events()) == text_of(live) and whole.events()[-2:] == live[-2:]
    assert (nothing.status, nothing.body) == (200, b"")


async def test_http_resume_of_a_saved_run_whose_log_lacks_its_end_waits_for_it_then_says_expired(
    thread, key, held, monkeypatch
):
    """The process that ran it writes its last events to the log a moment after the save; if it went away
    meanwhile, they never come."""
    monkeypatch.setattr(resume, "SETTLE_SECONDS", 0.01)
    held.release_all()
    asker = await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    live = await until(asker, ended)
    await asker.disconnect()
    message_id = live[0]["message_id"]
    cut = live[-2]["seq"]  # message_complete and done not logged
    kept = eventlog.local_log.runs[message_id].events
    while kept and kept[-1]["seq"] >= cut:
        kept.pop()
    if settings.REDIS_URL:
        async with asyncio.timeout(TIMEOUT):  # the run's publisher logs its last batch after the socket had it
            while await sync_to_async(eventlog.last_seq)(message_id) != live[-1]["seq"]:
                await asyncio.sleep(0.01)
        stream = redis.Redis.from_url(settings.REDIS_URL)
        entries = await sync_to_async(stream.xrange)(f"bankagent:run-events:{message_id}")
        late = [entry for entry, fields in entries if json.loads(fields[b"e"])["seq"] >= cut]
        await sync_to_async(stream.xdel)(f"bankagent:run-events:{message_id}", *late)

    followed = await get_events(thread, key, message_id, "after=1")
    await read_to_end(followed.communicator, followed)

    events = followed.events()
    assert followed.status == 200
    assert [event["seq"] for event in events[:-1]] == [event["seq"] for event in live if 1 < event["seq"] < cut]
    assert (events[-1]["event"], events[-1]["error_type"]) == ("error", "resume_expired")


@pytest.mark.parametrize(
    ("which", "query", "status", "code"),
    [
        ("another user's", "", 404, "not_found"),
        ("the question", "", 404, "not_found"),
        ("not-a-uuid", "", 404, "not_found"),
        ("the answer", "after=-1", 400, "invalid_resume"),
        ("the answer", "after=one", 400, "invalid_resume"),
        ("expired", "after=0", 410, "resume_expired"),
    ],
)
async def test_http_resume_refusals(thread, key, other_user_id, which, query, status, code):
    question, answer = await sync_to_async(finished_turn)(thread)
    foreign = await Thread.objects.acreate(user_id=other_user_id, agent_type="general_chat")
    _, foreign_answer = await sync_to_async(finished_turn)(foreign)
    if which == "expired":
        await expire(str(answer.pk))
    target = {"another user's": foreign_answer.pk, "the question": question.pk, "not-a-uuid": "not-a-uuid"}

    response = await get_events(thread, key, target.get(which, answer.pk), query)
    await read_to_end(response.communicator, response)

    assert response.status == status
    assert json.loads(response.body)["error"]["code"] == code


async def test_the_thread_names_its_active_run_and_the_seq_to_resume_from(thread, key, held, client):
    asker = await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": "Tell me a story"})
    had = await until(asker, deltas(3))

    detail = await sync_to_async(client.get)(f"/api/v1/threads/{thread.pk}")
    held.release_all()
    await until(asker, ended)
    after = await sync_to_async(client.get)(f"/api/v1/threads/{thread.pk}")
    await asker.disconnect()

    assert detail.json()["active_run"] == {"message_id": had[-1]["message_id"], "last_seq": had[-1]["seq"]}
    assert after.json()["active_run"] is None


def logged_run(log: eventlog.LocalLog, message_id: str) -> None:
    for seq, name in enumerate(["message_started", "text_delta", "message_complete", "done"], 1):
        log.append(message_id, {"event": name, "message_id": message_id, "seq": seq}, cumulative=False)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(eventlog, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    return now


@pytest.mark.parametrize(("redis_url", "kept_for"), [("", 300), ("redis://127.0.0.1:6379/0", 30)])
def test_the_process_keeps_an_ended_run_for_the_ttl_alone_and_briefly_when_redis_keeps_it(
    settings, clock, redis_url, kept_for
):
    settings.REDIS_URL, settings.RUN_EVENTS_TTL_SECONDS = redis_url, 300
    log = eventlog.LocalLog()
    logged_run(log, "ended")
    log.append("live", {"event": "message_started", "message_id": "live", "seq": 1}, cumulative=False)
    clock[0] += kept_for - 1
    logged_run(log, "other")
    assert [event["seq"] for event in log.since("ended", 0)] == [1, 2, 3, 4]
    clock[0] += 1
    log.append("other", {"event": "done", "message_id": "other", "seq": 5}, cumulative=False)
    assert log.since("ended", 0) is None
    assert log.since("live", 0) == [{"event": "message_started", "message_id": "live", "seq": 1}]


def test_the_process_keeps_at_most_so_many_ended_runs_the_oldest_going_first(settings, clock, monkeypatch):
    settings.REDIS_URL = ""
    monkeypatch.setattr(eventlog, "LOCAL_ENDED_MAX", 3)
    log = eventlog.LocalLog()
    log.append("live", {"event": "message_started", "message_id": "live", "seq": 1}, cumulative=False)
    for number in range(5):
        logged_run(log, f"run-{number}")
    log.append("live", {"event": "text_delta", "message_id": "live", "seq": 2}, cumulative=False)
    assert [message_id for message_id in log.runs if log.since(message_id, 0)] == ["live", "run-2", "run-3", "run-4"]
