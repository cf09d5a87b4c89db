"""How many runs one process serves at once, and how many of their models answer at once.

Past RUN_CONCURRENCY a new run is refused before anything is written. Of the runs accepted, RUN_MODEL_CONCURRENCY
have their model answer at once, the others wait their turn (their messages saved, message_started sent): a
thousand models streaming at once in one process cost twice the CPU each of a hundred at a time. And admitting
a query (its first events) goes before starting a model, during a burst.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from django.conf import settings

from bankagent.exceptions import Overloaded
from bankagent.metrics import record_refusal
from runs.loops import per_loop


class RunSlots:
    def __init__(self) -> None:
        self.taken = 0

    def take(self) -> None:
        """One run's slot, or Overloaded."""
        if self.taken >= settings.RUN_CONCURRENCY:
            record_refusal("overloaded", "runs")
            raise Overloaded()
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1


# The event loop is the process's only writer: no lock needed.
slots = RunSlots()


ADMISSION_BURST = 32
"""Queries being admitted at once past which models wait to start."""
ADMISSION_PRIORITY_SECONDS = 5.0
"""How long at most a model waits for a burst of admissions to settle."""


class ModelTurns:
    """Turns for models to answer, RUN_MODEL_CONCURRENCY at once.

    While a burst of queries is being admitted (their leases taken, their messages saved), a model waits to start,
    up to ADMISSION_PRIORITY_SECONDS: every query of the burst hears back first, then the models answer.
    """

    def __init__(self) -> None:
        self.free = asyncio.Semaphore(settings.RUN_MODEL_CONCURRENCY)
        self.admitting = 0
        self.settled = asyncio.Event()
        self.settled.set()

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        self.admitting += 1
        if self.admitting > ADMISSION_BURST:
            self.settled.clear()
        try:
            yield
        finally:
            self.admitting -= 1
            if self.admitting <= ADMISSION_BURST:
                self.settled.set()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if not self.settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), ADMISSION_PRIORITY_SECONDS)
        async with self.free:
            yield


model_turns = per_loop(ModelTurns)
"""The running event loop's turns for models to answer."""
