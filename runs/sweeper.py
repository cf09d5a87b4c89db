"""The periodic sweep: answers whose run died with its process are marked interrupted, and answers whose approvals
expired undecided go on (the model told so), even on threads nobody reads again. Every server process that has
started a run sweeps (each write is conditional: one process does each)."""

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Callable

from django.conf import settings
from django.utils import timezone

from bankagent.db import db, serve_outside_requests
from runs.loops import per_loop
from runs.selectors import answers_with_lapsed_approvals
from runs.services import runs_interrupt

GoOn = Callable[[uuid.UUID, uuid.UUID], None]
"""Has an answer (thread id, message id) whose approvals expired go on."""

logger = logging.getLogger(__name__)


async def sweep_forever(go_on: GoOn) -> None:
    serve_outside_requests()
    while True:
        await asyncio.sleep(settings.RUN_LEASE_SECONDS)
        try:
            if count := await db(runs_interrupt)():
                logger.info("Marked %d interrupted answers", count)
            for thread_id, message_id in await db(answers_with_lapsed_approvals)(now=timezone.now()):
                go_on(thread_id, message_id)
        except Exception:
            logger.warning("The sweep of interrupted answers failed; it runs again later", exc_info=True)


class Sweep:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def ensure(self, go_on: GoOn) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(sweep_forever(go_on), context=contextvars.Context())


sweep = per_loop(Sweep)
"""The sweep of the running event loop (one per server process)."""


def ensure_sweeper(go_on: GoOn) -> None:
    """Start this event loop's sweep, once; it has answers whose approvals expired go on through `go_on`."""
    sweep().ensure(go_on)
