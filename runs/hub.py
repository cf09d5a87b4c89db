"""This process's end of the run fan-out: the readers it serves, the runs it holds, and its channel-layer inbox.

Events of a run reach the readers of its thread in this process directly, and other processes through the
thread's group on the channel layer, whose members are the inboxes of processes with readers of that thread:
one message per batch and process, never one per socket. Cancels are few: each goes to every process (the
cancels group), and the one running the thread's run stops it.
"""

import asyncio
import contextvars
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from channels.layers import BaseChannelLayer, get_channel_layer

from runs.events import Event
from runs.loops import per_loop

logger = logging.getLogger(__name__)

CANCELS_GROUP = "run-cancels"
CANCEL_MARK_SECONDS = 30
RETRY_MAX_SECONDS = 5.0


def thread_group(thread_id: uuid.UUID) -> str:
    return f"thread.{thread_id.hex}"


class Reader(Protocol):
    """A local reader of a thread's events (a websocket); it must not wait."""

    def deliver(self, events: list[Event]) -> None: ...


@dataclass(eq=False)
class LocalRun:
    """A run this process executes, as far as stopping it is concerned."""

    thread_id: uuid.UUID
    received_at: float
    """When its query arrived (monotonic): a cancel marked after it is meant for this run."""
    stopped: str | None = None
    """Why it was told to stop ("cancelled", "lease_lost"), if it was."""
    on_stop: Callable[[], None] | None = None
    """Stops the model, once there is one running."""

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            if self.on_stop is not None:
                self.on_stop()


def _layer() -> BaseChannelLayer:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("No channel layer is configured.")
    return layer


LAYER_TIMEOUT_SECONDS = 5.0
"""How long a call to the channel layer may take: a Redis that accepts connections but never answers then fails
the call (a handshake answers service_unavailable) instead of holding it."""


async def _within_timeout(call: Awaitable[None]) -> None:
    await asyncio.wait_for(call, LAYER_TIMEOUT_SECONDS)


class Hub:
    def __init__(self) -> None:
        self.inbox: str | None = None
        self.readers: dict[str, set[Reader]] = defaultdict(set)
        self.runs: dict[str, LocalRun] = {}
        self.cancel_marks: dict[str, float] = {}
        self.cancels_joined = False
        self.listener: asyncio.Task | None = None
        self.pings: dict[str, asyncio.Future[None]] = {}
        self._inbox_lock = asyncio.Lock()

    # --- readers ------------------------------------------------------------------------------------------------------

    async def watch(self, thread_id: uuid.UUID, reader: Reader) -> None:
        """Deliver the thread's events to `reader` from now on. Raises when the channel layer is down."""
        key = thread_id.hex
        first = not self.readers[key]
        self.readers[key].add(reader)
        if first:
            try:
                await _within_timeout(_layer().group_add(thread_group(thread_id), await self._ensure_inbox()))
            except BaseException:
                self._forget_reader(key, reader)
                raise

    async def unwatch(self, thread_id: uuid.UUID, reader: Reader) -> None:
        key = thread_id.hex
        if self._forget_reader(key, reader) and self.inbox is not None:
            try:
                await _layer().group_discard(thread_group(thread_id), self.inbox)
            except Exception:
                # Harmless: events that still arrive for the thread find no reader here.
                logger.warning("Could not leave the group of thread %s", thread_id, exc_info=True)

    def _forget_reader(self, key: str, reader: Reader) -> bool:
        """Forget the reader; True when it was the thread's last one here."""
        readers = self.readers.get(key)
        if readers is None:
            return False
        readers.discard(reader)
        if readers:
            return False
        del self.readers[key]
        return True

    def deliver(self, thread_id: uuid.UUID, events: list[Event]) -> None:
        """Hand events to the thread's readers in this process."""
        self._deliver(thread_id.hex, events)

    async def publish_elsewhere(self, thread_id: uuid.UUID, events: list[Event]) -> None:
        """Send events to the thread's readers in other processes: one channel-layer message."""
        message = {"type": "run.events", "thread": thread_id.hex, "origin": self.inbox or "", "events": events}
        await _within_timeout(_layer().group_send(thread_group(thread_id), message))

    def _deliver(self, key: str, events: list[Event]) -> None:
        for reader in list(self.readers.get(key, ())):
            reader.deliver(events)

    # --- runs and cancels ---------------------------------------------------------------------------------------------

    async def listen_for_cancels(self) -> None:
        """Be reachable by cancels from every process; done once, before this process's first run starts."""
        if not self.cancels_joined:
            await _within_timeout(_layer().group_add(CANCELS_GROUP, await self._ensure_inbox()))
            self.cancels_joined = True

    def register(self, run: LocalRun) -> None:
        """The run is this thread's until `unregister`; a cancel that arrived since its query applies to it."""
        key = run.thread_id.hex
        self.runs[key] = run
        marked = self.cancel_marks.pop(key, None)
        if marked is not None and marked >= run.received_at:
            run.stop("cancelled")

    def unregister(self, run: LocalRun) -> None:
        key = run.thread_id.hex
        if self.runs.get(key) is run:
            del self.runs[key]

    async def cancel(self, thread_id: uuid.UUID) -> None:
        """Stop the thread's run, in whichever process it runs; nothing happens when none runs."""
        if self._cancel_here(thread_id.hex):
            return
        message = {"type": "run.cancel", "thread": thread_id.hex, "origin": self.inbox or ""}
        await _within_timeout(_layer().group_send(CANCELS_GROUP, message))

    def _cancel_here(self, key: str) -> bool:
        if run := self.runs.get(key):
            run.stop("cancelled")
            return True
        # The run may be starting here right now: its query has arrived, its lease is being taken.
        now = time.monotonic()
        self.cancel_marks[key] = now
        for stale in [k for k, at in self.cancel_marks.items() if now - at > CANCEL_MARK_SECONDS]:
            del self.cancel_marks[stale]
        return False

    async def ping(self, timeout: float) -> None:
        """A message through the channel layer to this process's inbox and back; raises if it does not come."""
        inbox = await self._ensure_inbox()
        token = uuid.uuid4().hex
        arrived = self.pings[token] = asyncio.get_running_loop().create_future()
        try:
            await _layer().send(inbox, {"type": "hub.ping", "token": token})
            await asyncio.wait_for(arrived, timeout)
        finally:
            del self.pings[token]

    # --- the inbox ----------------------------------------------------------------------------------------------------

    async def _ensure_inbox(self) -> str:
        async with self._inbox_lock:
            if self.inbox is None:
                self.inbox = await _layer().new_channel()
            if self.listener is None or self.listener.done():
                # A fresh context: the listener serves the process, not the request that happened to start it.
                self.listener = asyncio.create_task(self._listen(self.inbox), context=contextvars.Context())
            return self.inbox

    async def _listen(self, inbox: str) -> None:
        """Receive for this process until its event loop ends; an error is logged and retried, never fatal."""
        delay, rejoin = 0.1, False
        while True:
            try:
                if rejoin:
                    await self._rejoin(inbox)
                    rejoin = False
                message = await _layer().receive(inbox)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("The channel layer inbox failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay, rejoin = min(delay * 2, RETRY_MAX_SECONDS), True
                continue
            delay = 0.1
            try:
                self._dispatch(inbox, message)
            except Exception:
                logger.exception("Could not dispatch a %r message", message.get("type"))

    def _dispatch(self, inbox: str, message: dict) -> None:
        if message.get("origin") == inbox:
            return  # published here, and delivered here already
        kind, key = message.get("type"), message.get("thread", "")
        if kind == "run.events":
            self._deliver(key, message["events"])
        elif kind == "run.cancel":
            self._cancel_here(key)
        elif kind == "hub.ping" and (arrived := self.pings.get(message.get("token", ""))) and not arrived.done():
            arrived.set_result(None)

    async def _rejoin(self, inbox: str) -> None:
        """After an outage the layer may have lost its groups (Redis keeps nothing on disk): join them again."""
        for key in list(self.readers):
            await _layer().group_add(thread_group(uuid.UUID(key)), inbox)
        if self.cancels_joined:
            await _layer().group_add(CANCELS_GROUP, inbox)


hub = per_loop(Hub)
"""The hub of the running event loop (one per server process)."""
