"""Runs that outlive their caller, with their events fanned out through the channel layer.

Every event of a run goes to the thread's group, so every websocket on the thread gets it whichever process
runs it; a cancel goes to the thread's control group, which the run listens to wherever it runs.
"""

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator

from channels.layers import get_channel_layer

from agents.runner import finish_failed, prepare_run
from agents.streaming import Event, execute
from bankagent.exceptions import ServiceUnavailable
from threads.models import Thread

logger = logging.getLogger(__name__)

# Strong references: a run is a task of its own, not tied to the response or socket that started it.
_RUNS: set[asyncio.Task] = set()


def thread_group(thread_id: uuid.UUID) -> str:
    return f"thread.{thread_id.hex}"


def control_group(thread_id: uuid.UUID) -> str:
    return f"thread-control.{thread_id.hex}"


class RunHandle:
    """A started run; `events()` follows it for the caller that asked to listen."""

    def __init__(self, *, listen: bool) -> None:
        self.queue: asyncio.Queue[Event] | None = asyncio.Queue() if listen else None
        self.task: asyncio.Task | None = None

    async def events(self) -> AsyncIterator[Event]:
        assert self.queue is not None, "started without listen=True"
        while True:
            event = await self.queue.get()
            yield event
            if event["event"] == "done":
                return


class _CancelListener:
    """One control channel per process and event loop: cancels for the runs it holds arrive there.

    A single long-lived receive, rather than one per run, keeps channel-layer connections few and steady.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel = ""
        self.runs: dict[str, asyncio.Event] = {}

    async def subscribe(self, thread_id: uuid.UUID) -> asyncio.Event:
        """Only the holder of the thread's run lease subscribes, so the thread's entry is its own."""
        layer = get_channel_layer()
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            channel = await layer.new_channel()
            if self.loop is not loop:  # another run may have set it up while we waited
                self.loop, self.channel, self.runs = loop, channel, {}
                _RUNS.add(asyncio.create_task(self._listen(), context=contextvars.Context()))
        cancelled = self.runs[thread_id.hex] = asyncio.Event()
        await layer.group_add(control_group(thread_id), self.channel)
        return cancelled

    async def unsubscribe(self, thread_id: uuid.UUID) -> None:
        self.runs.pop(thread_id.hex, None)
        await get_channel_layer().group_discard(control_group(thread_id), self.channel)

    async def _listen(self) -> None:
        layer = get_channel_layer()
        while True:
            message = await layer.receive(self.channel)
            if message.get("type") == "run.cancel" and (run := self.runs.get(message.get("thread", ""))):
                run.set()


_cancels = _CancelListener()


async def start_stream(*, thread: Thread, query: str, request_id: str | None = None, listen: bool) -> RunHandle:
    """Save the user's message and start the run in the background (ThreadBusy when one is running)."""
    layer = get_channel_layer()
    group = thread_group(thread.pk)
    setup = await prepare_run(thread=thread, query=query)
    # Subscribed before the run emits its first event: a client cannot cancel a run it has not seen yet.
    try:
        cancelled = await _cancels.subscribe(thread.pk)
    except Exception as exc:
        error = ServiceUnavailable()
        await finish_failed(setup, error=error)
        raise error from exc
    handle = RunHandle(listen=listen)

    async def emit(event: Event) -> None:
        if request_id is not None:
            event = {**event, "request_id": request_id}
        if handle.queue is not None:
            handle.queue.put_nowait(event)
        try:
            await layer.group_send(group, {"type": "run.event", "event": event})
        except Exception:
            # Watchers miss this event; the run and what it saves must not depend on them.
            logger.exception("Could not publish an event of thread %s", thread.pk)

    async def run() -> None:
        try:
            await execute(setup, emit, cancelled)
        finally:
            await _cancels.unsubscribe(thread.pk)

    # A fresh context: the run must not inherit the request's thread-sensitive executor, which quits with it.
    handle.task = asyncio.create_task(run(), context=contextvars.Context())
    _RUNS.add(handle.task)
    handle.task.add_done_callback(_RUNS.discard)
    return handle


async def request_cancel(thread_id: uuid.UUID) -> None:
    """Stop the run on the thread, in whichever process it runs; nothing happens when none runs."""
    await get_channel_layer().group_send(control_group(thread_id), {"type": "run.cancel", "thread": thread_id.hex})
