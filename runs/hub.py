"""This process's end of the run fan-out: the readers it serves, the runs it holds, and its channel-layer inbox.

Events of a run reach the readers of its thread in this process directly, and other processes through the
thread's group on the channel layer, whose members are the inboxes of processes with readers of that thread:
one message per batch and process, never one per socket. Runs of a thread reach its readers in order: a run's
events may come from another process later than the next run's first, and are then held back until it ends.
Cancels are few: each goes to every process (the cancels group), and the one running the thread's run stops it.
"""

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from channels.layers import BaseChannelLayer, get_channel_layer

from runs.events import Event
from runs.loops import per_loop

logger = logging.getLogger(__name__)

CANCELS_GROUP = "run-cancels"
CANCEL_MARK_SECONDS = 30
RETRY_MAX_SECONDS = 5.0
ORDER_WAIT_SECONDS = 2.0
"""How long the next run's events wait for the end of the run before it, which another process published: past
it (that process died before saying so), they go out, and what still comes of the earlier run is dropped."""


def thread_group(thread_id: uuid.UUID) -> str:
    return f"thread.{thread_id.hex}"


class Reader(Protocol):
    """A local reader of a thread's events (a websocket); it must not wait."""

    def deliver(self, events: list[Event]) -> None: ...


@dataclass(eq=False)
class Order:
    """Which run of a thread its readers here are hearing, and the events of later runs held back meanwhile."""

    run: int = 0
    """The latest run (its answer's `seq`) whose events went out."""
    ended: bool = True
    held: list[tuple[int, list[Event]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


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


LAYER_TIMEOUT_SECONDS = 5.0
"""How long any one call to the channel layer may take, the inbox it needs included: a Redis that accepts
connections but never answers fails the call (a handshake answers service_unavailable) instead of holding it."""
CANCELS_WAIT_SECONDS = 1.0
"""How long the first runs of a process wait for it to be reachable by cancels from other processes: past it (the
channel layer does not answer), runs start without, and joining goes on in the background."""

T = TypeVar("T")


async def _within_timeout(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, LAYER_TIMEOUT_SECONDS)


class Hub:
    def __init__(self, layer: BaseChannelLayer | None = None) -> None:
        self.layer = layer
        """The channel layer; the configured one unless given."""
        self.inbox: str | None = None
        self.readers: dict[str, set[Reader]] = defaultdict(set)
        self.orders: dict[str, Order] = {}
        self.joins: dict[str, asyncio.Task[None]] = {}
        """For each thread with readers here, the joining of its group."""
        self.runs: dict[str, LocalRun] = {}
        self.cancel_marks: dict[str, float] = {}
        self.cancels_joined = False
        self.listener: asyncio.Task | None = None
        self.pings: dict[str, asyncio.Future[None]] = {}
        self._creating_inbox: asyncio.Task[str] | None = None
        self._joining_cancels: asyncio.Task[None] | None = None
        self._cancels_awaited_until = 0.0

    def _layer(self) -> BaseChannelLayer:
        layer = self.layer or get_channel_layer()
        if layer is None:
            raise RuntimeError("No channel layer is configured.")
        return layer

    # --- readers ------------------------------------------------------------------------------------------------------

    async def watch(self, thread_id: uuid.UUID, reader: Reader) -> None:
        """Deliver the thread's events to `reader` from now on. Raises, forgetting it, when the channel layer does
        not answer in time: the thread's group is joined once, and checked by a message through it, for every reader
        of the thread arriving meanwhile."""
        key = thread_id.hex
        self.readers[key].add(reader)
        joining = self.joins.get(key)
        if joining is None or (joining.done() and (joining.cancelled() or joining.exception() is not None)):
            join = _within_timeout(self._join(thread_group(thread_id), checked=True))
            joining = self.joins[key] = asyncio.create_task(join, context=contextvars.Context())
        try:
            await _within_timeout(asyncio.shield(joining))
        except BaseException:
            self._forget_reader(key, reader)
            raise

    async def unwatch(self, thread_id: uuid.UUID, reader: Reader) -> None:
        key = thread_id.hex
        if self._forget_reader(key, reader) and self.inbox is not None:
            try:
                await _within_timeout(self._layer().group_discard(thread_group(thread_id), self.inbox))
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
        if (joining := self.joins.pop(key, None)) is not None:
            joining.cancel()
        if (order := self.orders.pop(key, None)) is not None and order.timer is not None:
            order.timer.cancel()
        return True

    def deliver(self, thread_id: uuid.UUID, run: int, events: list[Event]) -> None:
        """Hand events of the thread's run `run` (its answer's `seq`) to the thread's readers in this process."""
        self._deliver(thread_id.hex, run, events)

    async def publish_elsewhere(self, thread_id: uuid.UUID, run: int, events: list[Event]) -> None:
        """Send events of a run to the thread's readers in other processes: one channel-layer message."""
        message = {
            "type": "run.events",
            "thread": thread_id.hex,
            "run": run,
            "origin": self.inbox or "",
            "events": events,
        }
        await _within_timeout(self._layer().group_send(thread_group(thread_id), message))

    def _deliver(self, key: str, run: int, events: list[Event]) -> None:
        if not self.readers.get(key):
            return
        order = self.orders.setdefault(key, Order())
        if run < order.run:
            return  # a run given up on: the next one's events went out already
        if run > order.run and not order.ended:
            order.held.append((run, events))
            if order.timer is None:
                order.timer = asyncio.get_running_loop().call_later(ORDER_WAIT_SECONDS, self._give_up, key, order)
            return
        order.run = run
        order.ended = any(event["event"] == "done" for event in events)
        for reader in list(self.readers[key]):
            reader.deliver(events)
        if order.ended:
            self._release(key, order)

    def _release(self, key: str, order: Order) -> None:
        """The run before has ended: the later runs' events go out, each run's in turn."""
        if order.timer is not None:
            order.timer.cancel()
            order.timer = None
        held, order.held = sorted(order.held, key=lambda batch: batch[0]), []
        for run, events in held:
            self._deliver(key, run, events)

    def _give_up(self, key: str, order: Order) -> None:
        order.timer = None
        if self.orders.get(key) is order:
            logger.warning("A run of thread %s did not end in %.0f s: its next run goes on", key, ORDER_WAIT_SECONDS)
            order.ended = True
            self._release(key, order)

    # --- runs and cancels ---------------------------------------------------------------------------------------------

    async def listen_for_cancels(self) -> None:
        """Be reachable by cancels from every process. The process joins the cancels group once; its first runs wait
        for that at most CANCELS_WAIT_SECONDS, and later ones not at all: while the channel layer does not answer,
        joining is retried in the background, and runs start without it."""
        if self.cancels_joined:
            return
        loop = asyncio.get_running_loop()
        if self._joining_cancels is None:
            self._joining_cancels = asyncio.create_task(self._join_cancels(), context=contextvars.Context())
            self._cancels_awaited_until = loop.time() + CANCELS_WAIT_SECONDS
        if (wait := self._cancels_awaited_until - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._joining_cancels), wait)

    async def _join_cancels(self) -> None:
        delay = 0.1
        while True:
            try:
                await _within_timeout(self._join(CANCELS_GROUP))
            except Exception:
                logger.warning("Cancels from other processes cannot reach runs here yet; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            else:
                self.cancels_joined = True
                return

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
        await _within_timeout(self._layer().group_send(CANCELS_GROUP, message))

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
        """A message through the channel layer to this process's inbox and back, all within `timeout`; raises if it
        does not come."""
        async with asyncio.timeout(timeout):
            await self._roundtrip(await self._ensure_inbox())

    async def _roundtrip(self, inbox: str) -> None:
        token = uuid.uuid4().hex
        arrived = self.pings[token] = asyncio.get_running_loop().create_future()
        try:
            await self._layer().send(inbox, {"type": "hub.ping", "token": token})
            await arrived
        finally:
            del self.pings[token]

    # --- the inbox ----------------------------------------------------------------------------------------------------

    async def _join(self, group: str, *, checked: bool = False) -> None:
        """Join `group`; if `checked`, once a message through the layer has come back too. (Joining only sends a
        request: a Redis that has stopped answering takes it without a word.)"""
        inbox = await self._ensure_inbox()
        await self._layer().group_add(group, inbox)
        if checked:
            await self._roundtrip(inbox)

    async def _ensure_inbox(self) -> str:
        """This process's inbox, created once: callers await the one creation under way, and none holds a lock
        while the channel layer answers (or does not)."""
        if self.inbox is None:
            if self._creating_inbox is None or self._creating_inbox.done():
                self._creating_inbox = asyncio.create_task(
                    _within_timeout(self._layer().new_channel()), context=contextvars.Context()
                )
            self.inbox = await asyncio.shield(self._creating_inbox)
        if self.listener is None or self.listener.done():
            # A fresh context: the listener serves the process, not the request that happened to start it.
            self.listener = asyncio.create_task(self._listen(self.inbox), context=contextvars.Context())
        return self.inbox

    async def _listen(self, inbox: str) -> None:
        """Receive for this process until its event loop ends; an error is logged and retried, never fatal. (Redis
        going away is the layer's to weather: its subscriber reconnects, and subscribes again, by itself.)"""
        delay = 0.1
        while True:
            try:
                message = await self._layer().receive(inbox)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("The channel layer inbox failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
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
            self._deliver(key, message["run"], message["events"])
        elif kind == "run.cancel":
            self._cancel_here(key)
        elif kind == "hub.ping" and (arrived := self.pings.get(message.get("token", ""))) and not arrived.done():
            arrived.set_result(None)


hub = per_loop(Hub)
"""The hub of the running event loop (one per server process)."""
