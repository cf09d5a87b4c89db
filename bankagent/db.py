"""Database work from async code: one hop to a worker thread per unit of work, never one per ORM call.

Inside a request the hop goes to the request's own thread, as Django's async ORM does (in tests, the test's
thread and transaction). Work that outlives requests (runs in the background, websockets) goes to any of
DATABASE_THREADS threads instead: Django's default outside a request, one thread for the whole process, would
serialise all of it. Either way idle connections are given back after each hop, as Channels does, so nothing
holds a connection while a model answers.
"""

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import cache, partial, wraps
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")

_shared_threads: ContextVar[bool] = ContextVar("db_on_shared_threads", default=False)


@cache
def _shared_executor() -> ThreadPoolExecutor:
    # As many threads as the connection pool has connections: a thread waiting on the database lets others run.
    return ThreadPoolExecutor(max_workers=settings.DATABASE_THREADS, thread_name_prefix="database")


def serve_outside_requests() -> None:
    """From here on, this task's database work runs on any of the pool's threads."""
    _shared_threads.set(True)


def _give_back_connections() -> None:
    for connection in connections.all(initialized_only=True):
        # A connection inside a transaction belongs to whoever opened it (a test's transaction, in tests).
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def db(function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`function` as a coroutine run on a worker thread, with its connections given back after."""

    @wraps(function)
    def work(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            _give_back_connections()

    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if _shared_threads.get():
            return await sync_to_async(work, thread_sensitive=False, executor=_shared_executor())(*args, **kwargs)
        return await sync_to_async(work)(*args, **kwargs)

    return call


class OwnThread:
    """One thread, and so one database connection, for work that must not queue behind requests and sockets (the
    lease keeper): its connection stays open between calls, so a pool busy with requests cannot hold it up either,
    and it is closed after a failure, to be opened afresh by the next call."""

    def __init__(self, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def __call__(self, function: Callable[P, R]) -> Callable[P, Awaitable[R]]:
        @wraps(function)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, partial(self._run, function, *args, **kwargs))

        return call

    @staticmethod
    def _run(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except Exception:
            connections.close_all()
            raise

    def close_connections(self) -> None:
        """Close the thread's connection (it is opened again when next needed)."""
        self.executor.submit(connections.close_all).result()
