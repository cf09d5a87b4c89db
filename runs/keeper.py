"""The process's lease keeper: it renews the leases of every run held here and checkpoints their partial answers,
in one transaction a tick for all of them, rather than in a write of each run's own.

A lease is renewed every third of RUN_LEASE_SECONDS, a changed answer saved every RUN_CHECKPOINT_SECONDS.
Database errors are logged and retried sooner: a lease must not lapse under a live run. A run found to have lost
its lease (its thread deleted, or the run interrupted meanwhile) is stopped.
"""

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings

from bankagent.db import OwnThread
from bankagent.jsontypes import JSON
from runs.hub import LocalRun
from runs.loops import per_loop
from runs.services import runs_renew
from runs.tools import ToolTimer

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a run has produced so far: checkpointed while it runs, saved if it stops early."""

    text: str = ""
    """The answer so far: accumulated text, or the JSON of the latest partial output."""
    output: JSON = None
    first_token_at: float | None = None
    tools: ToolTimer = field(default_factory=ToolTimer)


@dataclass(eq=False)
class Kept:
    local: LocalRun
    progress: Progress | None
    renewed_at: float = field(default_factory=time.monotonic)
    saved: str = ""


# Renewals must not wait behind the one thread Django and Channels share for database work outside requests (every
# socket's handshake and frames), nor behind a connection pool busy with requests: a run whose renewal is late is
# interrupted by the sweep of another process.
keeper_db = OwnThread("lease-keeper")


def _tick() -> float:
    return min(settings.RUN_CHECKPOINT_SECONDS, settings.RUN_LEASE_SECONDS / 3)


class LeaseKeeper:
    def __init__(self) -> None:
        self.kept: dict[uuid.UUID, Kept] = {}
        self.task: asyncio.Task | None = None

    def keep(self, message_id: uuid.UUID, local: LocalRun, progress: Progress | None = None) -> None:
        self.kept[message_id] = Kept(local, progress)
        if self.task is None or self.task.done():
            # A fresh context: the keeper serves the process, not the request that happened to start it.
            self.task = asyncio.create_task(self._keep_forever(), context=contextvars.Context())

    def drop(self, message_id: uuid.UUID) -> None:
        self.kept.pop(message_id, None)

    async def _keep_forever(self) -> None:
        delay = 0.0
        while True:
            await asyncio.sleep(delay or _tick())
            try:
                await self.renew_due()
                delay = 0.0
            except Exception:
                delay = min(max(delay * 2, 0.1), _tick())
                logger.warning("Could not renew the leases of %d runs; retrying", len(self.kept), exc_info=True)

    async def renew_due(self) -> None:
        """Renew the leases that are due and save the answers that changed, in one transaction."""
        now, tick = time.monotonic(), _tick()
        due: dict[uuid.UUID, Kept] = {}
        checkpoints: dict[uuid.UUID, tuple[str, JSON]] = {}
        for message_id, kept in list(self.kept.items()):
            if kept.progress is not None and kept.progress.text != kept.saved:
                checkpoints[message_id] = (kept.progress.text, kept.progress.output)
            if message_id in checkpoints or now - kept.renewed_at >= settings.RUN_LEASE_SECONDS / 3 - tick / 2:
                due[message_id] = kept
        if not due:
            return
        lost = await keeper_db(runs_renew)(
            message_ids=list(due), checkpoints=checkpoints, lease_seconds=settings.RUN_LEASE_SECONDS
        )
        for message_id, kept in due.items():
            if message_id in lost:
                self.drop(message_id)
                kept.local.stop("lease_lost")
                continue
            kept.renewed_at = now
            if message_id in checkpoints:
                kept.saved = checkpoints[message_id][0]


keeper = per_loop(LeaseKeeper)
"""The keeper of the running event loop (one per server process)."""
