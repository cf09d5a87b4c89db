"""A run's events, kept for whoever missed them: while the run goes on and for RUN_EVENTS_TTL_SECONDS after it ends.

Each event of a run carries `seq`, 1, 2, 3 … within its answer. This process keeps the events of the runs it
serves (`local_log`); with Redis, every run's events also go to a Redis stream of their own (`SharedLog`), so that
any process can give them again. A resume reads both, and gets every event after the one it names, in order.
Without Redis the process keeps at most LOCAL_ENDED_MAX ended runs, so a resume of an older one may find it
expired before RUN_EVENTS_TTL_SECONDS, and reads the thread instead.

What is kept is bounded per run: a structured answer's partial outputs are cumulative, so of consecutive ones only
the latest is kept; past RUN_EVENTS_MAX events the oldest go, and a resume from before them finds nothing.
"""

import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import redis
import redis.asyncio
from django.conf import settings

from runs.events import Event
from runs.loops import per_loop

logger = logging.getLogger(__name__)

RUN_EVENTS_MAX = 10_000
"""Events kept of one run, at most (a structured answer's partial outputs count once a run of them)."""

LOCAL_ENDED_MAX = 1_000
"""Ended runs this process keeps, at most: the oldest go first, whatever their age."""

LOCAL_ENDED_SECONDS_WITH_REDIS = 30
"""How long this process keeps an ended run when Redis keeps it too: long enough to cover a Redis that missed its
last events, short enough that a busy process does not hold minutes of answers twice."""


def _is_delta(event: Event) -> bool:
    return event["event"] == "text_delta"


def compacted(events: Iterable[Event], *, cumulative: bool) -> list[Event]:
    """The events worth keeping: a cumulative delta followed by another one is superseded by it."""
    kept: list[Event] = []
    for event in events:
        if cumulative and kept and _is_delta(kept[-1]) and _is_delta(event):
            kept[-1] = event
        else:
            kept.append(event)
    return kept


def _after(events: Iterable[Event], after: int) -> list[Event] | None:
    """The events after seq `after`, or None when some of them are no longer kept: the earliest kept event is
    never a delta, so a log that lost its beginning starts after `after + 1`."""
    kept = list(events)
    if not kept or kept[0]["seq"] > after + 1:
        return None
    return [event for event in kept if event["seq"] > after]


@dataclass
class RunEvents:
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=RUN_EVENTS_MAX))
    ended_at: float | None = None


class LocalLog:
    """The events of the runs of this process, which no process can give more promptly than it."""

    def __init__(self) -> None:
        self.runs: dict[str, RunEvents] = {}
        self.ended: dict[str, float] = {}
        """Runs that ended, by when, oldest first."""

    def append(self, message_id: str, event: Event, *, cumulative: bool) -> None:
        self._forget_expired()
        kept = self.runs.get(message_id)
        if kept is None:
            kept = self.runs[message_id] = RunEvents()
        if cumulative and kept.events and _is_delta(kept.events[-1]) and _is_delta(event):
            kept.events[-1] = event
        else:
            kept.events.append(event)
        if event["event"] == "done":
            kept.ended_at = time.monotonic()
            self.ended.pop(message_id, None)
            self.ended[message_id] = kept.ended_at
        elif kept.ended_at is not None:  # continued (a decision on an approval)
            kept.ended_at = None
            self.ended.pop(message_id, None)

    def since(self, message_id: str, after: int) -> list[Event] | None:
        kept = self.runs.get(message_id)
        return None if kept is None else _after(kept.events, after)

    def last_seq(self, message_id: str) -> int | None:
        kept = self.runs.get(message_id)
        return kept.events[-1]["seq"] if kept is not None and kept.events else None

    def _forget_expired(self) -> None:
        kept_for = settings.RUN_EVENTS_TTL_SECONDS
        if settings.REDIS_URL:
            kept_for = min(kept_for, LOCAL_ENDED_SECONDS_WITH_REDIS)
        horizon = time.monotonic() - kept_for
        while self.ended:
            message_id, ended_at = next(iter(self.ended.items()))
            if ended_at > horizon and len(self.ended) <= LOCAL_ENDED_MAX:
                break
            del self.ended[message_id]
            self.runs.pop(message_id, None)


local_log = LocalLog()
"""This process's runs' events."""


def _key(message_id: str) -> str:
    return f"bankagent:run-events:{message_id}"


def _decoded(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Event]:
    return [json.loads(fields[b"e"]) for _, fields in entries]


class SharedLog:
    """Every run's events in Redis, a stream a run, each entry one event; the stream expires
    RUN_EVENTS_TTL_SECONDS after its last event."""

    def __init__(self) -> None:
        self.client = redis.asyncio.Redis.from_url(settings.REDIS_URL, **settings.REDIS_TIMEOUTS)

    async def append(self, message_id: str, events: list[Event], *, superseded: bytes | None) -> bytes | None:
        """Add the events (and drop `superseded`, the entry of a cumulative delta the first of them replaces);
        returns the entry of the last one when it is a delta another may supersede."""
        key = _key(message_id)
        async with self.client.pipeline(transaction=False) as pipe:
            if superseded is not None:
                pipe.xdel(key, superseded)
            for event in events:
                pipe.xadd(key, {"e": json.dumps(event)}, maxlen=RUN_EVENTS_MAX, approximate=True)
            pipe.expire(key, int(settings.RUN_EVENTS_TTL_SECONDS))
            replies = await pipe.execute()
        return replies[-2] if events and _is_delta(events[-1]) else None

    async def since(self, message_id: str, after: int) -> list[Event] | None:
        return _after(_decoded(await self.client.xrange(_key(message_id))), after)


shared_log = per_loop(SharedLog)
"""The shared log of the running event loop: its connections belong to it."""


@cache
def _sync_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, **settings.REDIS_TIMEOUTS)


def last_seq(message_id: str) -> int | None:
    """The seq of the run's latest event kept anywhere; for code outside the event loop. A Redis that does not
    answer counts as knowing nothing."""
    seq = local_log.last_seq(message_id)
    if settings.REDIS_URL:
        try:
            latest = _sync_client().xrevrange(_key(message_id), count=1)
        except redis.RedisError:
            logger.warning("Could not read the events of run %s", message_id, exc_info=True)
        else:
            if latest:
                seq = max(seq or 0, _decoded(latest)[0]["seq"])
    return seq


async def events_since(message_id: str, after: int) -> list[Event] | None:
    """The run's events after seq `after`, from this process and from Redis, each once and in order; None when
    neither keeps all of them (the run is unknown, or its log expired)."""
    local = local_log.since(message_id, after)
    shared = None
    if settings.REDIS_URL:
        try:
            shared = await shared_log().since(message_id, after)
        except redis.RedisError:
            logger.warning("Could not read the events of run %s", message_id, exc_info=True)
    if local is None and shared is None:
        return None
    by_seq = {event["seq"]: event for event in (*(shared or ()), *(local or ()))}
    return [by_seq[seq] for seq in sorted(by_seq)]
