"""How many runs one process serves at once, and how many of their models answer at once.

Past RUN_CONCURRENCY a new run is refused before anything is written. Of the runs accepted, RUN_MODEL_CONCURRENCY
have their model answer at once, the others wait their turn (their messages saved, message_started sent): a
thousand models streaming at once in one process cost twice the CPU each of a hundred at a time.
"""

import asyncio
import weakref

from django.conf import settings

from bankagent.exceptions import Overloaded


class RunSlots:
    def __init__(self) -> None:
        self.taken = 0

    def take(self) -> None:
        """One run's slot, or Overloaded."""
        if self.taken >= settings.RUN_CONCURRENCY:
            raise Overloaded()
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1


# The event loop is the process's only writer: no lock needed.
slots = RunSlots()


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def model_turns() -> asyncio.Semaphore:
    """The running event loop's turns for models to answer."""
    loop = asyncio.get_running_loop()
    if (found := _turns.get(loop)) is None:
        found = _turns[loop] = asyncio.Semaphore(settings.RUN_MODEL_CONCURRENCY)
    return found
