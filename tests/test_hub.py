"""The run fan-out of runs/hub.py: two Hubs on one in-memory channel layer stand for two server processes."""

import asyncio
import contextlib
import uuid

import pytest
from channels.layers import get_channel_layer

from runs import broadcast as broadcast_module
from runs import hub as hub_module
from runs.broadcast import Broadcast
from runs.hub import Hub, LocalRun

TIMEOUT = 5


class Reader:
    """A socket as the hub sees it: every batch delivered to it, in order."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.arrived = asyncio.Event()

    def deliver(self, events: list[dict]) -> None:
        self.batches.append(events)
        self.arrived.set()

    async def until(self, event: dict) -> None:
        """Wait until `event` has been delivered."""
        async with asyncio.timeout(TIMEOUT):
            while not any(event in batch for batch in self.batches):
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
async def hubs(settings):
    """Two processes' hubs on one in-memory channel layer; their inbox listeners end with the test."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    made = Hub(), Hub()
    yield made
    for hub in made:
        if hub.listener is not None:
            hub.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub.listener


def stoppable(thread_id: uuid.UUID, received_at: float) -> tuple[LocalRun, asyncio.Event]:
    """A run whose query arrived at `received_at`, and the event set when it is told to stop."""
    stopped = asyncio.Event()
    return LocalRun(thread_id=thread_id, received_at=received_at, on_stop=stopped.set), stopped


async def stops(stopped: asyncio.Event) -> None:
    async with asyncio.timeout(TIMEOUT):
        await stopped.wait()


async def publish(hub: Hub, thread_id: uuid.UUID, events: list[dict]) -> None:
    """A batch of a run's events, as its broadcast hands them on: to readers here, then to other processes."""
    hub.deliver(thread_id, events)
    await hub.publish_elsewhere(thread_id, events)


def delta(text: str) -> dict:
    return {"event": "text_delta", "message_id": "m", "token": text}


async def test_events_published_in_one_process_reach_the_threads_readers_everywhere_exactly_once(hubs):
    here, there = hubs
    thread_id, other_thread_id = uuid.uuid4(), uuid.uuid4()
    local, remote, elsewhere = Reader(), Reader(), Reader()
    await here.watch(thread_id, local)
    await there.watch(thread_id, remote)
    await there.watch(other_thread_id, elsewhere)

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
    await there.watch(thread_id, leaving)
    await there.watch(thread_id, staying)

    await there.unwatch(thread_id, leaving)
    await publish(here, thread_id, [{"event": "done"}])
    await staying.until({"event": "done"})

    assert leaving.batches == []


async def test_cancel_reaches_a_run_registered_in_the_other_process(hubs, clock):
    here, there = hubs
    thread_id = uuid.uuid4()
    await here.listen_for_cancels()
    run, stopped = stoppable(thread_id, received_at=clock.now)
    here.register(run)

    await there.cancel(thread_id)

    await stops(stopped)
    assert run.stopped == "cancelled"


async def test_cancel_in_the_runs_own_process_stops_it_at_once(hubs, clock):
    here, _ = hubs
    thread_id = uuid.uuid4()
    await here.listen_for_cancels()
    run, _ = stoppable(thread_id, received_at=clock.now)
    here.register(run)

    await here.cancel(thread_id)

    assert run.stopped == "cancelled"


async def cancel_arriving_while_the_run_starts(here: Hub, there: Hub, thread_id: uuid.UUID) -> None:
    """A cancel from the other process reaches `here` after listen_for_cancels and before register."""
    await here.listen_for_cancels()
    reader = Reader()
    await here.watch(thread_id, reader)
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
    await here.listen_for_cancels()
    finished, _ = stoppable(thread_id, received_at=clock.now)
    here.register(finished)
    clock.now += 1
    following, following_stopped = stoppable(thread_id, received_at=clock.now)
    here.register(following)

    here.unregister(finished)  # the first run's clean-up, after the next one started
    await there.cancel(thread_id)

    await stops(following_stopped)
    assert (finished.stopped, following.stopped) == (None, "cancelled")


async def test_inbox_listener_survives_a_receive_error_and_rejoins_its_groups(hubs, clock, monkeypatch, caplog):
    here, there = hubs
    thread_id = uuid.uuid4()
    layer = get_channel_layer()
    receive, failed, listening_again = layer.receive, asyncio.Event(), asyncio.Event()

    async def receive_failing_once(channel: str) -> dict:
        if not failed.is_set():
            failed.set()
            await layer.flush()  # an outage: the layer comes back without its groups (Redis keeps none on disk)
            raise ConnectionError("the channel layer went away")
        listening_again.set()
        return await receive(channel)

    monkeypatch.setattr(layer, "receive", receive_failing_once)
    reader = Reader()
    await here.watch(thread_id, reader)
    await here.listen_for_cancels()
    async with asyncio.timeout(TIMEOUT):
        await failed.wait()
        await listening_again.wait()  # messages sent while the inbox was away are lost, as they would be

    await publish(there, thread_id, [{"event": "done"}])
    await reader.until({"event": "done"})
    run, stopped = stoppable(thread_id, received_at=clock.now)
    here.register(run)
    await there.cancel(thread_id)
    await stops(stopped)

    assert not here.listener.done()
    assert "inbox failed" in caplog.text


async def test_a_stalled_channel_layer_is_reported_once_per_run_not_once_per_event(monkeypatch, caplog):
    stalled = asyncio.Event()

    async def never_returns(self, thread_id: uuid.UUID, events: list) -> None:
        stalled.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Hub, "publish_elsewhere", never_returns)
    monkeypatch.setattr(broadcast_module, "PUBLISH_BACKLOG", 3)
    broadcast = Broadcast(thread_id=uuid.uuid4(), cumulative=True)
    broadcast.emit({"event": "message_started", "message_id": "m"})
    await stalled.wait()  # the first batch is stuck in the layer; the rest wait behind it

    for index in range(50):
        broadcast.emit({"event": "tool_call", "message_id": "m", "tool_call": {"name": f"lookup-{index}", "args": {}}})

    stalled_reports = [record for record in caplog.records if "not being published" in record.getMessage()]
    assert len(stalled_reports) == 1
    broadcast.task.cancel()
