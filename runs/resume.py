"""Resuming a run: a reader that missed some of a run's events gets them from the run's log, then the live ones,
each `seq` once and in order, whichever process runs it."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bankagent.db import db
from bankagent.exceptions import InvalidResume, NotFound, ResumeExpired
from runs.eventlog import events_since
from runs.events import Backlog, BacklogFull, Event, error_event
from runs.hub import hub
from runs.selectors import run_answer_status
from threads.models import Message

SETTLE_SECONDS = 2.0
"""How long a reader of a run that is saved, but whose log lacks its end, waits for its last events: the process that
ran it writes them to the log a moment after the save."""


def resume_point(message_id: object, after: object) -> tuple[uuid.UUID, int]:
    """The run and the seq to resume after, as a client gives them (in JSON, or as text in a URL); NotFound for a
    run id that is not one, InvalidResume for anything but a whole number of at least 0."""
    if isinstance(after, str) and after.isascii() and after.isdigit():
        after = int(after)
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidResume()
    try:
        return uuid.UUID(str(message_id)), after
    except ValueError as exc:
        raise NotFound("There is no such answer on this thread.") from exc


SEEN_RUNS = 64
"""Runs a reader remembers the last event of; older ones are forgotten (their events are long over)."""


class Catchup:
    """What a reader has had of each run, so that what it hears of a run it resumes is each event once, in order:
    the run's log first, its live events held back meanwhile."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.holding: dict[str, list[Event]] = {}

    def admit(self, events: list[Event]) -> list[Event]:
        """The events to pass on: none twice, none of a run being resumed (they wait for its log)."""
        passed = []
        for event in events:
            message_id, seq = event.get("message_id"), event.get("seq")
            if not isinstance(message_id, str) or not isinstance(seq, int):
                passed.append(event)  # not a run's (a pong, an answer to a frame)
            elif (held := self.holding.get(message_id)) is not None:
                held.append(event)
            elif seq > self.sent.get(message_id, 0):
                self._sent(message_id, seq)
                passed.append(event)
        return passed

    def hold(self, message_id: str, after: int) -> None:
        """The reader has had the run's events up to `after`; its live ones wait until `resumed`."""
        self.holding.setdefault(message_id, [])
        self._sent(message_id, max(self.sent.get(message_id, 0), after))

    def resumed(self, message_id: str, logged: list[Event]) -> list[Event]:
        """The run's events to pass on: those of its log the reader has not had, then those held meanwhile."""
        held = self.holding.pop(message_id, [])
        return self.admit([*logged, *held])

    def _sent(self, message_id: str, seq: int) -> None:
        self.sent.pop(message_id, None)  # the most recently heard last
        self.sent[message_id] = seq
        if len(self.sent) > SEEN_RUNS:
            del self.sent[next(iter(self.sent))]


@dataclass(frozen=True)
class Resumed:
    missed: list[Event]
    """The run's events after the resume point that the reader has not had, in order."""
    kept: bool
    """False when its log expired: the reader should read the thread again."""
    running: bool
    """Whether the run was in progress: more of its events may come live."""


async def resume(
    catchup: Catchup, *, thread_id: uuid.UUID, user_id: uuid.UUID, message_id: uuid.UUID, after: int
) -> Resumed:
    """Resume the thread's run `message_id` after `after` for a reader that already hears the thread's live
    events (or is held back already: `Catchup.hold`): those of this run wait while its log is read. Raises
    NotFound."""
    key = str(message_id)
    catchup.hold(key, after)
    try:
        status = await db(run_answer_status)(thread_id=thread_id, user_id=user_id, message_id=message_id)
        logged = await events_since(key, after)
    except BaseException:
        catchup.resumed(key, [])
        raise
    running = status == Message.Status.IN_PROGRESS
    # A run in progress whose log is not there yet has said nothing another process could give again.
    return Resumed(catchup.resumed(key, logged or []), logged is not None or running, running)


class RunFollower:
    """One run's events for one reader (an NDJSON response): its log after `after`, then live, to its `done`."""

    def __init__(self, thread_id: uuid.UUID, message_id: uuid.UUID, backlog: Backlog) -> None:
        self.thread_id = thread_id
        self.message_id = str(message_id)
        self.backlog = backlog
        self.catchup = Catchup()
        self.finished = False

    def deliver(self, events: list[Event]) -> None:
        self.hand_on(self.catchup.admit([event for event in events if event.get("message_id") == self.message_id]))

    def hand_on(self, events: list[Event]) -> None:
        with contextlib.suppress(BacklogFull):  # the reader is cut off, as a slow NDJSON reader is
            self.backlog.put_many(events)
        if events and events[-1]["event"] == "done":
            self.finished = True

    def end_unless_finished(self) -> None:
        """Its last events never came (the process that ran it went away): the reader reads the thread instead."""
        if not self.finished:
            self.hand_on([error_event(ResumeExpired(), message_id=self.message_id)])
            self.backlog.end()

    async def events(self) -> AsyncIterator[list[Event]]:
        """Batches of the run's events up to its `done`; the thread is no longer watched once they end."""
        try:
            async for batch in self.backlog.batches():
                yield batch
        finally:
            await hub().unwatch(self.thread_id, self)


async def follow(
    *, thread_id: uuid.UUID, user_id: uuid.UUID, message_id: uuid.UUID, after: int, backlog: Backlog
) -> RunFollower:
    """Follow the run `message_id` of the thread from after `after`. Raises NotFound, ResumeExpired, or the
    channel layer's failure."""
    follower = RunFollower(thread_id, message_id, backlog)
    await hub().watch(thread_id, follower)
    try:
        resumed = await resume(
            follower.catchup, thread_id=thread_id, user_id=user_id, message_id=message_id, after=after
        )
        if not resumed.kept:
            raise ResumeExpired()
    except BaseException:
        await hub().unwatch(thread_id, follower)
        raise
    follower.hand_on(resumed.missed)
    if not resumed.running:
        if follower.finished or not resumed.missed:
            backlog.end()  # it had ended: what was missed is all there is
        else:
            asyncio.get_running_loop().call_later(SETTLE_SECONDS, follower.end_unless_finished)
    return follower
