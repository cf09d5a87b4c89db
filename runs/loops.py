"""One object per running event loop: per server process, and a fresh one for each test's loop."""

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def per_loop(factory: Callable[[], T]) -> Callable[[], T]:
    """A function returning the running loop's object, made by `factory` the first time."""
    objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def of_running_loop() -> T:
        loop = asyncio.get_running_loop()
        if (found := objects.get(loop)) is None:
            found = objects[loop] = factory()
        return found

    return of_running_loop
