"""The periodic sweep: answers whose run died with its process are marked interrupted even on threads nobody
reads again. Every server process that has started a run sweeps (the update is idempotent)."""

import asyncio
import contextvars
import logging

from django.conf import settings

from bankagent.db import db, serve_outside_requests
from runs.loops import per_loop
from runs.services import runs_interrupt

logger = logging.getLogger(__name__)


async def sweep_forever() -> None:
    serve_outside_requests()
    while True:
        await asyncio.sleep(settings.RUN_LEASE_SECONDS)
        try:
            if count := await db(runs_interrupt)():
                logger.info("Marked %d interrupted answers", count)
        except Exception:
            logger.warning("The sweep of interrupted answers failed; it runs again later", exc_info=True)


class Sweep:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(sweep_forever(), context=contextvars.Context())


sweep = per_loop(Sweep)
"""The sweep of the running event loop (one per server process)."""


def ensure_sweeper() -> None:
    """Start this event loop's sweep, once."""
    sweep().ensure()
