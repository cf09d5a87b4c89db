"""The contract's stream events: building them, holding a backlog of them for a slow reader, encoding them.

The same events go to every transport (an NDJSON response, a websocket, another process); each reader encodes
them in the dialect of its credentials.
"""

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from enum import StrEnum

from rest_framework.exceptions import APIException

from bankagent.exceptions import error_body
from bankagent.jsontypes import JSON

Event = dict[str, JSON]


class Dialect(StrEnum):
    """How a client names the events: the contract's, or those of the service this one replaced."""

    STANDARD = "standard"
    LEGACY = "legacy"
    """Deltas are named `token`; tool and approval events are left out."""


LEGACY_UNKNOWN = frozenset({"tool_call", "tool_result", "approval_required", "approval_decided"})
"""Events the replaced service's client does not know."""


def error_event(error: APIException, **extra: JSON) -> Event:
    """The contract's error event: the same code and message as the HTTP error, under the names the service this
    one replaced gave them."""
    body = error_body(error)["error"]
    event: Event = {"event": "error", "error": body["message"], "error_type": body["code"], **extra}
    if body.get("details"):
        event["details"] = body["details"]
    return event


# Valid in JSON text, but line breaks to a client that splits lines the way Python's str.splitlines() does.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def encode(event: Event, dialect: Dialect) -> str | None:
    """One event as JSON text, or None when the dialect has no such event."""
    if dialect is Dialect.LEGACY:
        name = event["event"]
        if name in LEGACY_UNKNOWN:
            return None
        if name == "text_delta":
            event = {**event, "event": "token"}
    return json.dumps(event, ensure_ascii=False).translate(_UNICODE_LINE_BREAKS)


def merge_delta(earlier: Event, later: Event, *, cumulative: bool) -> Event | None:
    """Two consecutive deltas of one answer as one, or None when they cannot merge.

    A structured answer's token is the whole partial output so far, so the later one stands for both; a text
    answer's token is the new text, so the two are joined.
    """
    if not (earlier["event"] == later["event"] == "text_delta"):
        return None
    if earlier.get("message_id") != later.get("message_id") or earlier.get("request_id") != later.get("request_id"):
        return None
    if cumulative:
        return later
    return {**later, "token": f"{earlier['token']}{later['token']}"}


class BacklogFull(Exception):
    """A reader fell further behind than its bound: it is dropped, the run goes on."""


class Backlog:
    """Events waiting for one reader. Deltas merge while they wait, so a reader that cannot keep up gets
    fewer, larger deltas instead of a growing queue; past `max_events` waiting events the reader is dropped.
    """

    def __init__(self, *, cumulative: bool, max_events: int, merge_text: bool = True) -> None:
        self.cumulative = cumulative
        self.merges = cumulative or merge_text
        self.max_events = max_events
        self.events: deque[Event] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False
        self.ended = False
        """Nothing more will be put: what waits is the last of it."""

    def put(self, event: Event) -> None:
        """Queue an event without waiting; raises BacklogFull once the reader is too far behind."""
        if self.overflowed:
            raise BacklogFull()
        if self.merges and self.events and (merged := merge_delta(self.events[-1], event, cumulative=self.cumulative)):
            self.events[-1] = merged
        else:
            if len(self.events) >= self.max_events:
                self.overflowed = True
                self.ready.set()
                raise BacklogFull()
            self.events.append(event)
        self.ready.set()

    def put_many(self, events: list[Event]) -> None:
        for event in events:
            self.put(event)

    async def wait(self) -> None:
        """Until something is waiting, or nothing ever will; raises BacklogFull after an overflow."""
        while not self.events and not self.ended:
            if self.overflowed:
                raise BacklogFull()
            self.ready.clear()
            await self.ready.wait()

    def end(self) -> None:
        self.ended = True
        self.ready.set()

    def ends_with_done(self) -> bool:
        return bool(self.events) and self.events[-1]["event"] == "done"

    async def take(self) -> list[Event]:
        """Everything waiting, once something is; raises BacklogFull after an overflow."""
        await self.wait()
        if self.overflowed:
            raise BacklogFull()
        events = list(self.events)
        self.events.clear()
        return events

    async def batches(self) -> AsyncIterator[list[Event]]:
        """What waits, a batch at a time, up to a `done` or the end; nothing more once the reader is cut off."""
        while not (self.ended and not self.events):
            try:
                batch = await self.take()
            except BacklogFull:
                return
            if batch:
                yield batch
                if batch[-1]["event"] == "done":
                    return
