"""A run from its query to its saved answer: the one path every entry point takes.

`open_run` takes one of the process's run slots, makes the run reachable by cancels and, in one hop to the
database, takes the thread's lease and saves the user's message. `run_blocking` then awaits the model;
`runs.pipeline` streams it. Both end in `close_run`, which saves the answer in one statement.
"""

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from pydantic_ai.usage import RunUsage
from pydantic_core import to_jsonable_python

from agents.llm import agent_model, model_failure, model_label
from agents.registry import AgentSpec, agent_spec
from bankagent.db import db
from bankagent.exceptions import ApplicationError, NotFound, RunInterrupted, as_application_error
from bankagent.jsontypes import JSON, JSONObject
from runs.broadcast import Broadcast
from runs.events import Event, error_event
from runs.hub import LocalRun, hub
from runs.keeper import Progress, keeper
from runs.limits import model_turns, slots
from runs.services import RunStart, run_begin, run_finish, run_message_exists
from runs.sweeper import ensure_sweeper
from threads.models import Message, Thread

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message and the assistant's answer to it."""

    thread: Thread
    user_message: Message
    assistant_message: Message


@dataclass(eq=False)
class Run:
    spec: AgentSpec
    model: Model
    query: str
    start: RunStart
    local: LocalRun
    started: float

    @property
    def turn(self) -> Turn:
        return Turn(self.start.thread, self.start.user_message, self.start.assistant_message)

    @property
    def message_id(self) -> uuid.UUID:
        return self.start.assistant_message.pk


def _deps_for(agent_type: str, user_id: uuid.UUID) -> object:
    return agent_spec(agent_type).deps_for(user_id)


async def open_run(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Run:
    """Take a slot and the thread's lease, and save the user's message; raises, writing nothing, when the model
    is not configured, the process is at its bound of runs, or the thread is missing or busy."""
    received_at = time.monotonic()
    model = agent_model()
    slots.take()
    try:
        try:
            await hub().listen_for_cancels()
        except Exception:
            logger.warning("Cancels sent through other processes cannot reach a run on %s", thread_id, exc_info=True)
        with model_turns().admission():
            start = await db(run_begin)(
                thread_id=thread_id,
                user_id=user_id,
                query=query,
                model_label=model_label(model),
                lease_seconds=settings.RUN_LEASE_SECONDS,
                history_turns=settings.AGENT_HISTORY_TURNS,
                deps_for=_deps_for,
            )
    except BaseException:
        slots.give_back()
        raise
    local = LocalRun(thread_id=thread_id, received_at=received_at)
    run = Run(agent_spec(start.thread.agent_type), model, query, start, local, time.monotonic())
    hub().register(local)
    ensure_sweeper()
    return run


def keep(run: Run, progress: Progress | None = None) -> None:
    """Have the process's keeper renew the run's lease (and checkpoint its progress) until it is released."""
    keeper().keep(run.message_id, run.local, progress)


def release(run: Run) -> None:
    keeper().drop(run.message_id)
    hub().unregister(run.local)
    slots.give_back()


async def until_stopped(run: Run, model_call: Coroutine[object, object, R]) -> R:
    """Await the model, once one of the process's model turns is free, unless the run is stopped first
    (cancelled, or its lease lost): then CancelledError."""

    async def in_turn() -> R:
        async with model_turns().turn():
            return await model_call

    task = asyncio.ensure_future(in_turn())
    run.local.on_stop = task.cancel
    if run.local.stopped:
        task.cancel()
    try:
        return await task
    finally:
        run.local.on_stop = None
        if inspect.getcoroutinestate(model_call) == inspect.CORO_CREATED:
            model_call.close()  # stopped before its turn came: never started, and never to be


def usage_metadata(usage: RunUsage) -> dict[str, JSON]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
    }


async def close_run(
    run: Run,
    *,
    status: str,
    content: str,
    output: JSON,
    model_messages: list[ModelMessage] | None = None,
    **metadata: JSON,
) -> None:
    """Save the run's answer. Raises NotFound (the thread was deleted meanwhile) or RunInterrupted (another
    run took the lapsed lease over): the answer is then discarded."""
    message = run.start.assistant_message
    message.status, message.content = status, content
    message.output = output if run.spec.structured else None
    message.metadata = {"model": message.metadata.get("model"), "duration_ms": _elapsed_ms(run), **metadata}
    saved = await _retrying(
        db(run_finish),
        message_id=message.pk,
        status=status,
        content=content,
        output=message.output,
        metadata=message.metadata,
        model_messages=to_jsonable_python(model_messages) if model_messages is not None else None,
    )
    if not saved:
        gone = not await db(run_message_exists)(message_id=message.pk)
        raise NotFound("The thread was deleted while the answer was being written.") if gone else RunInterrupted()


SAVE_RETRY_DELAYS = (0.1, 0.5, 2.0)
"""Pauses between attempts to save an answer after a transient database error (a lost connection, a lock)."""


async def _retrying(save: Callable[..., Awaitable[bool]], **fields: object) -> bool:
    for delay in (*SAVE_RETRY_DELAYS, None):
        try:
            return await save(**fields)
        except (OperationalError, InterfaceError):
            if delay is None:
                raise
            logger.warning("Could not save an answer; retrying in %.1f s", delay, exc_info=True)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def close_complete(run: Run, result: AgentRunResult[object], **metadata: JSON) -> None:
    """Save the answer of a run the model finished."""
    await close_run(
        run,
        status=Message.Status.COMPLETE,
        content=final_content(run, result.output),
        output=result.output,
        model_messages=result.new_messages(),
        usage=usage_metadata(result.usage),
        **metadata,
    )


def _elapsed_ms(run: Run) -> int:
    return round((time.monotonic() - run.started) * 1000)


def final_content(run: Run, output: JSON) -> str:
    return json.dumps(output, ensure_ascii=False) if run.spec.structured else str(output)


def error_info(error: ApplicationError) -> JSONObject:
    return {"code": error.code, "message": error.message}


def message_created(run: Run) -> Event:
    user = run.start.user_message
    return {"event": "message_created", "message": {"id": str(user.pk), "role": "user", "content": user.content}}


def message_started(run: Run) -> Event:
    return {"event": "message_started", "message_id": str(run.message_id)}


def message_complete(run: Run) -> Event:
    message = run.start.assistant_message
    return {
        "event": "message_complete",
        "message_id": str(message.pk),
        "status": message.status,
        "content": message.content,
        "output": message.output,
    }


async def run_blocking(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Turn:
    """Answer `query` and return the saved exchange; a model failure is saved, then raised.

    The run goes on if the caller goes away: its answer is saved all the same.
    """
    # One task from taking the lease to saving the answer: a caller gone even while the lease is being taken
    # leaves a run that answers, not a lease nobody renews or releases.
    task = asyncio.create_task(_blocking(user_id=user_id, thread_id=thread_id, query=query))
    # Held until done: when the caller is gone, nothing else holds the run's task.
    _BLOCKING.add(task)
    task.add_done_callback(_forget)
    return await asyncio.shield(task)


_BLOCKING: set[asyncio.Task] = set()


def _forget(task: asyncio.Task) -> None:
    _BLOCKING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the caller that would have seen it may be gone, and the run reported it


async def _blocking(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Turn:
    run = await open_run(user_id=user_id, thread_id=thread_id, query=query)
    broadcast = Broadcast(thread_id=run.start.thread.pk, cumulative=run.spec.structured)
    try:
        broadcast.emit(message_created(run))
        broadcast.emit(message_started(run))
        keep(run)
        try:
            result = await until_stopped(
                run,
                run.spec.agent.run(run.query, message_history=run.start.history, deps=run.start.deps, model=run.model),
            )
        except asyncio.CancelledError:
            if run.local.stopped is None:
                raise
            await _stopped(run)
        except Exception as exc:
            error = model_failure(exc)
            await close_run(run, status=Message.Status.FAILED, content="", output=None, error=error_info(error))
            raise error from exc
        else:
            await close_complete(run, result)
        broadcast.emit(message_complete(run))
    except Exception as exc:
        # Whatever failed (saving the answer, most likely), readers must not get `done` alone.
        broadcast.emit(error_event(as_application_error(exc), message_id=str(run.message_id)))
        raise
    finally:
        # Released first: nothing a reader does with the last event can keep the thread busy.
        release(run)
        broadcast.emit({"event": "done"})
    return run.turn


async def _stopped(run: Run) -> None:
    """A cancelled blocking run has no partial answer to keep. One whose lease was lost no longer holds its
    message: closing it raises what happened to it."""
    await close_run(run, status=Message.Status.INCOMPLETE, content="", output=None, cancelled=True)
