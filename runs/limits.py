"""How many runs one process serves at once: past the bound a new run is refused before anything is written."""

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
