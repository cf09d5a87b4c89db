"""The run fan-out of runs/hub.py: two Hubs, each on a Redis pub/sub channel layer of its own (its own connections),
stand for two server processes. Like production's layer, it drops what nobody is subscribed to when it is sent,
where the in-memory layer would queue it."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from django.conf import settings

from runs import broadcast as broadcast_module
from runs import hub as hub_module
from runs.broadcast import Broadcast
from runs.hub import Hub, LocalRun
from tests.conftest import close_hubs, pubsub_layer

TIMEOUT = 10

pytestmark = pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="needs REDIS_URL: processes meet on Redis pub/sub, which drops what the in-memory layer would queue",
)


class Reader:
    """A socket as the hub sees it: every batch delivered to it, in order."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.arrived = asyncio.Event()

    def deliver(self, events: list[dict]) -> None:
        self.batches.append(events)
        self.arrived.set()

    @property
    def events(self) -> list[dict]:
        return [event for batch in self.batches for event in batch]

    async def until(self, event: dict) -> None:
        """Wait until `event` has been delivered."""
        async with asyncio.timeout(TIMEOUT):
            while event not in self.events:
                self.arrived.clear()
                await self.arrived.wait()


class Clock:
    """The hub's monotonic clock, stopped: which of a query and a cancel came first is the test's choice."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    stopped = Clock()
    monkeypatch.setattr(hub_module, "time", stopped)
    return stopped


@pytest.fixture
async def hubs() -> AsyncIterator[tuple[Hub, Hub]]:
    """Two processes' hubs on the machine's Redis."""
    made = Hub(pubsub_layer(settings.REDIS_URL)), Hub(pubsub_layer(settings.REDIS_URL))
    yield made
    await close_hubs(*made)


async def cancellable(hub: Hub) -> None:
    """Join the cancels group, and wait until Redis has the subscription."""
    await hub.listen_for_cancels()
    assert hub.cancels_joined
    await hub.ping(TIMEOUT)


async def watching(hub: Hub, thread_id: uuid.UUID, reader: Reader) -> None:
    """Watch the thread, and wait until Redis has the subscription: one sent a moment before it would be lost."""
    await hub.watch(thread_id, reader)
    await hub.ping(TIMEOUT)


def stoppable(thread_id: uuid.UUID, received_at: float) -> tuple[LocalRun, asyncio.Event]:
    """A run whose query arrived at `received_at`, and the event set when it is told to stop."""
    stopped = asyncio.Event()
    return LocalRun(thread_id=thread_id, received_at=received_at, on_stop=stopped.set), stopped


async def stops(stopped: asyncio.Event) -> None:
    async with asyncio.timeout(TIMEOUT):
        await stopped.wait()


async def publish(hub: Hub, thread_id: uuid.UUID, events: list[dict], run: int = 2) -> None:
    """A batch of the events of run `run` (its answer's seq), as its broadcast hands them on: to readers here, then
    to other processes."""
    hub.deliver(thread_id, run, events)
    await hub.publish_elsewhere(thread_id, run, events)


def delta(text: str) -> dict:
    return {"event": "text_delta", "message_id": "m", "token": text}


async def test_events_published_in_one_process_reach_the_threads_readers_everywhere_exactly_once(hubs):
    here, there = hubs
    thread_id, other_thread_id = uuid.uuid4(), uuid.uuid4()
    local, remote, elsewhere = Reader(), Reader(), Reader()
    await watching(here, thread_id, local)
    await watching(there, thread_id, remote)
    await watching(there, other_thread_id, elsewhere)

    await publish(here, thread_id, [delta("a")])
    await publish(here, thread_id, [delta("b"), {"event": "done"}])
    await remote.until({"event": "done"})
    # Markers sent the other way: each reaches its reader after anything still on its way to that reader.
    await publish(there, thread_id, [{"event": "marker-from-there"}])
    await local.until({"event": "marker-from-there"})
    await publish(here, other_thread_id, [{"event": "marker-from-here"}])
    await elsewhere.until({"event": "marker-from-here"})

    sent = [[delta("a")], [delta("b"), {"event": "done"}]]
    assert local.batches == [*sent, [{"event": "marker-from-there"}]]  # its own events once, not echoed back
    assert remote.batches == [*sent, [{"event": "marker-from-there"}]]
    assert elsewhere.batches == [[{"event": "marker-from-here"}]]


async def test_a_reader_that_left_gets_nothing_more(hubs):
    here, there = hubs
    thread_id = uuid.uuid4()
    leaving, staying = Reader(), Reader()
    await watching(there, thread_id, leaving)
    await watching(there, thread_id, staying)

    await there.unwatch(thread_id, leaving)
    await publish(here, thread_id, [{"event": "done"}])
    await staying.until({"event": "done"})

    assert leaving.batches == []


async def test_cancel_reaches_a_run_registered_in_the_other_process(hubs, clock):
    here, there = hubs
    thread_id = uuid.uuid4()
    await cancellable(here)
    run, stopped = stoppable(thread_id, received_at=clock.now)
    here.register(run)

    await there.cancel(thread_id)

    await stops(stopped)
    assert run.stopped == "cancelled"


async def test_cancel_in_the_runs_own_process_stops_it_at_once(hubs, clock):
    here, _ = hubs
    thread_id = uuid.uuid4()
    await cancellable(here)
    run, _ = stoppable(thread_id, received_at=clock.now)
    here.register(run)

    await here.cancel(thread_id)

    assert run.stopped == "cancelled"


async def cancel_arriving_while_the_run_starts(here: Hub, there: Hub, thread_id: uuid.UUID) -> None:
    """A cancel from the other process reaches `here` after listen_for_cancels and before register."""
    await cancellable(here)
    reader = Reader()
    await watching(here, thread_id, reader)
    await there.cancel(thread_id)
    # The inbox hands messages on in order: once this one is delivered, the cancel has been handled.
    await publish(there, thread_id, [{"event": "after-the-cancel"}])
    await reader.until({"event": "after-the-cancel"})


async def test_cancel_arriving_before_the_run_registers_applies_to_the_run_whose_query_came_first(hubs, clock):
    here, there = hubs
    thread_id = uuid.uuid4()
    query_at = clock.now
    clock.now += 1
    await cancel_arriving_while_the_run_starts(here, there, thread_id)
    clock.now += 1

    run, _ = stoppable(thread_id, received_at=query_at)
    here.register(run)

    assert run.stopped == "cancelled"


async def test_cancel_arriving_before_the_run_registers_spares_a_run_whose_query_came_after_it(hubs, clock):
    here, there = hubs
    thread_id = uuid.uuid4()
    await cancel_arriving_while_the_run_starts(here, there, thread_id)
    clock.now += 1

    run, _ = stoppable(thread_id, received_at=clock.now)
    here.register(run)

    assert run.stopped is None
    # The cancel meant for an earlier run is not kept for a later one either.
    here.unregister(run)
    following, _ = stoppable(thread_id, received_at=clock.now)
    here.register(following)
    assert following.stopped is None


async def test_unregistering_a_finished_run_keeps_the_next_run_on_the_thread_cancellable(hubs, clock):
    here, there = hubs
    thread_id = uuid.uuid4()
    await cancellable(here)
    finished, _ = stoppable(thread_id, received_at=clock.now)
    here.register(finished)
    clock.now += 1
    following, following_stopped = stoppable(thread_id, received_at=clock.now)
    here.register(following)

    here.unregister(finished)  # the first run's clean-up, after the next one started
    await there.cancel(thread_id)

    await stops(following_stopped)
    assert (finished.stopped, following.stopped) == (None, "cancelled")


async def test_a_stalled_channel_layer_is_reported_once_per_run_not_once_per_event(
    settings, silent_redis, monkeypatch, caplog
):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": silent_redis.url, **settings.REDIS_TIMEOUTS}]},
        }
    }
    monkeypatch.setattr(broadcast_module, "PUBLISH_BACKLOG", 3)
    broadcast = Broadcast(thread_id=uuid.uuid4(), run=2, message_id=uuid.uuid4(), cumulative=True)
    broadcast.emit({"event": "message_started", "message_id": "m"})
    async with asyncio.timeout(TIMEOUT):
        while not silent_redis.connections:  # the first batch is on its way to a Redis that will not answer
            await asyncio.sleep(0.01)

    for index in range(50):
        broadcast.emit({"event": "tool_call", "message_id": "m", "tool_call": {"name": f"lookup-{index}", "args": {}}})

    stalled_reports = [record for record in caplog.records if "not being published" in record.getMessage()]
    assert len(stalled_reports) == 1
    broadcast.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await broadcast.task


# Runs of a thread reach its readers in order


async def test_a_runs_last_events_reach_readers_before_the_next_runs_first_whichever_comes_first(hubs):
    """The next run can start in another process the moment this one is released: its first events may reach a
    third process before this run's last ones."""
    here, there = hubs
    reader, thread_id = Reader(), uuid.uuid4()
    reader_hub = Hub(pubsub_layer(settings.REDIS_URL))
    try:
        await watching(reader_hub, thread_id, reader)
        await publish(here, thread_id, [{"event": "message_started", "message_id": "run 2"}], run=2)
        await publish(there, thread_id, [{"event": "message_started", "message_id": "run 4"}], run=4)
        await publish(there, thread_id, [{"event": "done", "run": 4}], run=4)
        await publish(here, thread_id, [{"event": "message_complete", "message_id": "run 2"}], run=2)
        await publish(here, thread_id, [{"event": "done", "run": 2}], run=2)
        await reader.until({"event": "done", "run": 4})
    finally:
        await close_hubs(reader_hub)

    assert reader.events == [
        {"event": "message_started", "message_id": "run 2"},
        {"event": "message_complete", "message_id": "run 2"},
        {"event": "done", "run": 2},
        {"event": "message_started", "message_id": "run 4"},
        {"event": "done", "run": 4},
    ]


async def test_a_run_whose_end_never_comes_holds_the_next_one_back_only_so_long_and_its_late_events_are_dropped(
    hubs, monkeypatch
):
    monkeypatch.setattr(hub_module, "ORDER_WAIT_SECONDS", 0)  # its process died: the wait is the test's to end
    here, there = hubs
    reader, thread_id = Reader(), uuid.uuid4()
    await watching(here, thread_id, reader)
    await publish(there, thread_id, [{"event": "message_started", "message_id": "run 2"}], run=2)
    await reader.until({"event": "message_started", "message_id": "run 2"})

    await publish(there, thread_id, [{"event": "message_started", "message_id": "run 4"}], run=4)
    await reader.until({"event": "message_started", "message_id": "run 4"})
    await publish(there, thread_id, [{"event": "done", "run": 2}], run=2)
    await publish(there, thread_id, [{"event": "done", "run": 4}], run=4)
    await reader.until({"event": "done", "run": 4})

    assert {"event": "done", "run": 2} not in reader.events


async def test_the_runs_own_process_orders_its_readers_events_too(hubs):
    here, _ = hubs
    reader, thread_id = Reader(), uuid.uuid4()
    await watching(here, thread_id, reader)

    here.deliver(thread_id, 2, [{"event": "message_started", "message_id": "run 2"}])
    here.deliver(thread_id, 4, [{"event": "message_started", "message_id": "run 4"}])
    assert reader.events == [{"event": "message_started", "message_id": "run 2"}]
    here.deliver(thread_id, 2, [{"event": "done"}])

    assert reader.events == [
        {"event": "message_started", "message_id": "run 2"},
        {"event": "done"},
        {"event": "message_started", "message_id": "run 4"},
    ]
