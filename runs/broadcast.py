"""Where a run's events go: the caller that listens to it (an NDJSON response), every reader of its thread, and the
run's event log (for whoever missed them).

Each event gets the answer's id and its `seq`. Events are never awaited by the run. Readers in this process get each
event at once, in their own backlogs; for other processes a publisher adds what has gathered over a few milliseconds
to the log in Redis, then sends it as one channel-layer message: a reader there that read the log before an event
was added to it is subscribed by then, and hears it.
"""

import asyncio
import contextvars
import logging
import uuid

from django.conf import settings

from runs.eventlog import RUN_EVENTS_MAX, SharedLog, compacted, local_log, shared_log
from runs.events import Backlog, BacklogFull, Event
from runs.hub import hub

logger = logging.getLogger(__name__)

PUBLISH_BACKLOG = 10_000
"""Events of one run waiting for the channel layer; a structured answer's deltas merge, so only a stalled layer comes
near it. (A text answer's do not: a resumed reader would not know where a merged one starts.)"""
PUBLISH_LINGER_SECONDS = 0.02
"""How long a batch for other processes gathers events before it is sent: readers there hear of a run a little
later, and a run sends a handful of messages rather than one per delta."""


_PUBLISHING: set[asyncio.Task] = set()


class Broadcast:
    def __init__(
        self,
        *,
        thread_id: uuid.UUID,
        run: int,
        message_id: uuid.UUID,
        cumulative: bool,
        first_seq: int = 0,
        request_id: str | None = None,
        listener: Backlog | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.run = run
        self.message_id = str(message_id)
        self.cumulative = cumulative
        self.seq = first_seq
        self.request_id = request_id
        self.listener = listener
        self.pending = Backlog(cumulative=cumulative, max_events=PUBLISH_BACKLOG, merge_text=False)
        self.shared: SharedLog | None = shared_log() if settings.REDIS_URL else None
        self.unlogged: list[Event] = []
        self.superseded: bytes | None = None
        self.hub = hub()
        # A fresh context: publishing belongs to the run, not to the request that started it. Held until done, as
        # the last events are published after the run has let go of its broadcast.
        self.task = asyncio.create_task(self._publish(), context=contextvars.Context())
        _PUBLISHING.add(self.task)
        self.task.add_done_callback(_PUBLISHING.discard)

    def emit(self, event: Event) -> None:
        self.seq += 1
        event = {**event, "message_id": self.message_id, "seq": self.seq}
        if self.request_id is not None:
            event["request_id"] = self.request_id
        local_log.append(self.message_id, event, cumulative=self.cumulative)
        if self.shared is not None and len(self.unlogged) < RUN_EVENTS_MAX:
            self.unlogged.append(event)
        if self.listener is not None:
            try:
                self.listener.put(event)
            except BacklogFull:
                # The caller stopped reading; the run and every other reader go on without it.
                self.listener = None
        self.hub.deliver(self.thread_id, self.run, [event])
        if self.pending.overflowed:
            return  # said once, below
        try:
            self.pending.put(event)
        except BacklogFull:
            logger.error("Events of thread %s are not being published: the channel layer is stalled", self.thread_id)

    async def _publish(self) -> None:
        while True:
            try:
                await self.pending.wait()
                if not self.pending.ends_with_done():
                    await asyncio.sleep(PUBLISH_LINGER_SECONDS)
                batch = await self.pending.take()
            except BacklogFull:
                return
            await self._log()
            try:
                await self.hub.publish_elsewhere(self.thread_id, self.run, batch)
            except Exception:
                # Readers here have had the batch; readers in other processes miss it.
                logger.warning("Could not publish events of thread %s", self.thread_id, exc_info=True)
            if batch[-1]["event"] == "done":
                return

    async def _log(self) -> None:
        """Add what was emitted since to the run's log in Redis, before other processes hear of it."""
        if self.shared is None or not self.unlogged:
            return
        events, self.unlogged = compacted(self.unlogged, cumulative=self.cumulative), []
        superseded = self.superseded if events[0]["event"] == "text_delta" else None
        try:
            latest = await self.shared.append(self.message_id, events, superseded=superseded)
        except Exception:
            logger.warning("Could not keep events of run %s: other processes cannot give them again", self.message_id)
            return
        self.superseded = latest if self.cumulative else None

    async def flushed(self) -> None:
        """Wait until every emitted event, `done` included, has been handed on."""
        await asyncio.shield(self.task)
