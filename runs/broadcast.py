"""Where a run's events go: the caller that listens to it (an NDJSON response), and every reader of its thread.

Events are never awaited by the run. Readers in this process get each event at once, in their own backlogs;
for other processes a publisher sends what has gathered over a few milliseconds as one channel-layer message.
"""

import asyncio
import contextvars
import logging
import uuid

from runs.events import Backlog, BacklogFull, Event
from runs.hub import hub

logger = logging.getLogger(__name__)

PUBLISH_BACKLOG = 10_000
"""Events of one run waiting for the channel layer; deltas merge, so only a stalled layer comes near it."""
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
        cumulative: bool,
        request_id: str | None = None,
        listener: Backlog | None = None,
    ) -> None:
        self.thread_id = thread_id
        self.run = run
        self.request_id = request_id
        self.listener = listener
        self.pending = Backlog(cumulative=cumulative, max_events=PUBLISH_BACKLOG)
        self.hub = hub()
        # A fresh context: publishing belongs to the run, not to the request that started it. Held until done, as
        # the last events are published after the run has let go of its broadcast.
        self.task = asyncio.create_task(self._publish(), context=contextvars.Context())
        _PUBLISHING.add(self.task)
        self.task.add_done_callback(_PUBLISHING.discard)

    def emit(self, event: Event) -> None:
        if self.request_id is not None:
            event = {**event, "request_id": self.request_id}
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
            try:
                await self.hub.publish_elsewhere(self.thread_id, self.run, batch)
            except Exception:
                # Readers here have had the batch; readers in other processes miss it.
                logger.warning("Could not publish events of thread %s", self.thread_id, exc_info=True)
            if batch[-1]["event"] == "done":
                return

    async def flushed(self) -> None:
        """Wait until every emitted event, `done` included, has been handed on."""
        await asyncio.shield(self.task)
