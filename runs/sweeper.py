"""The periodic sweep: answers whose run died with its process are marked interrupted even on threads nobody
reads again. Every server process that has started a run sweeps (the update is idempotent)."""

import asyncio
import contextvars
import logging
import weakref

from django.conf import settings

from bankagent.db import db, serve_outside_requests
from runs.services import runs_interrupt

logger = logging.getLogger(__name__)

_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


async def sweep_forever() -> None:
    serve_outside_requests()
    while True:
        await asyncio.sleep(settings.RUN_LEASE_SECONDS)
        try:
            if count := await db(runs_interrupt)():
                logger.info("Marked %d interrupted answers", count)
        except Exception:
            logger.warning("The sweep of interrupted answers failed; it runs again later", exc_info=True)


def ensure_sweeper() -> None:
    """Start this event loop's sweep, once."""
    loop = asyncio.get_running_loop()
    task = _sweepers.get(loop)
    if task is None or task.done():
        _sweepers[loop] = asyncio.create_task(sweep_forever(), context=contextvars.Context())
