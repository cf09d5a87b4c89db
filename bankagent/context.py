"""Where a log line, a trace or an audit record comes from: the request, and once known the user, thread and run.

Values live in context variables: an asyncio task copies them when it is created, so a streamed run's background
task keeps its request's, and a value set inside a run stays within it.
"""

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from django.core.signals import request_finished

from bankagent.middleware import ASGIApp, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A caller's own request id is kept when it is short and plain: it ends up in logs, traces and audit records."""

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
user_id: ContextVar[str | None] = ContextVar("user_id", default=None)
thread_id: ContextVar[str | None] = ContextVar("thread_id", default=None)
run_id: ContextVar[str | None] = ContextVar("run_id", default=None)

FIELDS = {"request_id": request_id, "user_id": user_id, "thread_id": thread_id, "run_id": run_id}

on_bind: Callable[[dict[str, str]], None] | None = None
"""Told the values each `bind` and `bound` sets (tracing sets them on the current span); None: nobody listens."""


@dataclass(frozen=True)
class Actor:
    """Who acts, as audit records name them. Never a secret: an API key is named by its prefix alone."""

    kind: Literal["api_key", "login", "staff", "command", "system", "anonymous"]
    name: str
    """The API key's prefix, the login's username, or the command or process acting on its own."""
    user_id: str | None = None
    """The end user a request acts for."""
    login_id: int | None = None
    """The Django login's primary key (a chat page user, a staff user)."""


actor: ContextVar[Actor | None] = ContextVar("actor", default=None)
"""Set once a request's credentials are known (identity.authentication); the audit trail reads it."""


@contextmanager
def acting(who: Actor) -> Iterator[None]:
    """Acts as `who` for the block (a management command, a process's own work)."""
    token = actor.set(who)
    try:
        yield
    finally:
        actor.reset(token)


def current() -> dict[str, str]:
    """The values known here, by name."""
    return {name: value for name, variable in FIELDS.items() if (value := variable.get()) is not None}


@contextmanager
def bound(**values: object) -> Iterator[None]:
    """Sets the given values (by FIELDS name) for the block, as strings."""
    tokens = [(FIELDS[name], FIELDS[name].set(str(value))) for name, value in values.items() if value is not None]
    if on_bind is not None:
        on_bind({name: str(value) for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def bind(**values: object) -> None:
    """Sets the given values for the rest of the current context (a request's, a task's)."""
    for name, value in values.items():
        if value is not None:
            FIELDS[name].set(str(value))
    if on_bind is not None:
        on_bind({name: str(value) for name, value in values.items() if value is not None})


def _forget(sender: object, **kwargs: object) -> None:
    """Forgets the user, thread and run of the request that finished. Served by the event loop, a request has a
    context of its own; served synchronously (Django's test client), the next request would find them."""
    for variable in (user_id, thread_id, run_id):
        variable.set(None)


request_finished.connect(_forget)


def request_id_of(scope: Scope) -> str:
    """The caller's X-Request-ID when it is plain enough to keep, a new one otherwise."""
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER:
            given = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class ASGIRequestId:
    """Gives every HTTP request and websocket connection a request id, and says it in the X-Request-ID response
    header (a websocket's in its handshake's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        rid = request_id_of(scope)
        token = request_id.set(rid)
        header = (REQUEST_ID_HEADER, rid.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
