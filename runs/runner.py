"""A run from its query to its saved answer: the one path every entry point takes.

`start_run` starts the run in a task of its own, which outlives whoever asked: `open_run` takes one of the
process's run slots, makes the run reachable by cancels and, in one hop to the database, takes the thread's lease
and saves the user's message; `execute` then has the model answer (whole for `run_blocking`, streamed for
`runs.pipeline`), saves the answer in one statement, and ends every run alike, with `done`.
"""

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from pydantic_ai.tools import DeferredToolRequests
from pydantic_ai.usage import RunUsage
from pydantic_core import to_jsonable_python
from rest_framework.exceptions import APIException

from agents.llm import agent_model, model_failure, model_label
from agents.registry import AgentSpec, agent_spec
from bankagent.db import db, serve_outside_requests
from bankagent.exceptions import (
    ApplicationError,
    ApprovalExpired,
    ApprovalLapsed,
    ModelError,
    NotFound,
    RunInterrupted,
    as_application_error,
)
from bankagent.jsontypes import JSON, JSONObject
from runs.approvals import approval_decide, approvals_lapse
from runs.broadcast import Broadcast
from runs.events import Backlog, Event, error_event
from runs.hub import LocalRun, hub
from runs.keeper import Progress, keeper
from runs.limits import model_turns, slots
from runs.selectors import run_answer_state
from runs.services import PendingCall, RunStart, run_begin, run_finish
from runs.sweeper import ensure_sweeper
from runs.tools import tool_calls_of
from threads.models import Approval, Message, Thread

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
    start: RunStart
    local: LocalRun
    started: float

    @property
    def query(self) -> str | None:
        return self.start.query

    @property
    def turn(self) -> Turn:
        return Turn(self.start.thread, self.start.user_message, self.start.assistant_message)

    @property
    def message_id(self) -> uuid.UUID:
        return self.start.assistant_message.pk


def _deps_for(agent_type: str, user_id: uuid.UUID) -> object:
    return agent_spec(agent_type).deps_for(user_id)


Take = Callable[[str], RunStart | None]
"""Takes the thread's lease in the database for a run of the model named, saving what the run starts with; None
when there is nothing to run (a decision that leaves other approvals pending)."""


def question(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Take:
    """Taking the thread for a new question: the question saved with the answer the run will fill."""

    def take(label: str) -> RunStart:
        return run_begin(
            thread_id=thread_id,
            user_id=user_id,
            query=query,
            model_label=label,
            lease_seconds=settings.RUN_LEASE_SECONDS,
            history_turns=settings.AGENT_HISTORY_TURNS,
            deps_for=_deps_for,
        )

    return take


def decision(*, user_id: uuid.UUID, thread_id: uuid.UUID, approval_id: uuid.UUID, approved: bool, note: str) -> Take:
    """Taking the thread for an answer that goes on after the customer's decision (see `approval_decide`)."""

    def take(label: str) -> RunStart | None:
        return approval_decide(
            thread_id=thread_id,
            user_id=user_id,
            approval_id=approval_id,
            approved=approved,
            note=note,
            lease_seconds=settings.RUN_LEASE_SECONDS,
            history_turns=settings.AGENT_HISTORY_TURNS,
            deps_for=_deps_for,
        )

    return take


async def open_run(*, thread_id: uuid.UUID, take: Take) -> Run | None:
    """Take a slot and the thread's lease (see `Take`); raises, writing nothing, when the model is not configured,
    the process is at its bound of runs, or the thread is missing or busy."""
    received_at = time.monotonic()
    model = agent_model()
    # Before the slot: nothing is held while the channel layer answers (or, for a while, does not).
    await hub().listen_for_cancels()
    slots.take()
    try:
        with model_turns().admission():
            start = await db(take)(model_label(model))
    except BaseException:
        slots.give_back()
        raise
    if start is None:
        slots.give_back()
        return None
    local = LocalRun(thread_id=thread_id, received_at=received_at)
    run = Run(agent_spec(start.thread.agent_type), model, start, local, time.monotonic())
    hub().register(local)
    ensure_sweeper(finish_lapsed)
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


def usage_metadata(usage: RunUsage, before: JSON = None) -> dict[str, JSON]:
    """The run's usage, added to `before`: what the answer used before it stopped for approval."""
    counts: dict[str, JSON] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
    }
    if isinstance(before, dict):
        counts = {name: value + before.get(name, 0) for name, value in counts.items()}  # type: ignore[operator]
    return counts


async def close_run(
    run: Run,
    progress: Progress,
    *,
    status: str,
    content: str,
    output: JSON,
    model_messages: list[ModelMessage] | None = None,
    approvals: list[PendingCall] | None = None,
    events_seq: int = 0,
    **metadata: JSON,
) -> None:
    """Save the run's answer (with what it said before, if it went on after an approval), or the answer stopped to
    wait for `approvals`, retrying after a transient database error. Raises NotFound (the thread was deleted
    meanwhile) or RunInterrupted (another run took the lapsed lease over): the answer is then discarded."""
    message = run.start.assistant_message
    message.status, message.content = status, content
    message.output = output if run.spec.structured else None
    timing = {"duration_ms": _elapsed_ms(run)}
    if progress.first_token_at is not None:
        timing["time_to_first_token_ms"] = round((progress.first_token_at - run.started) * 1000)
    message.metadata = {"model": message.metadata.get("model"), **timing, **metadata}
    said = None if model_messages is None else [*run.start.earlier, *model_messages]
    if said is not None:
        message.tool_calls = _tool_calls(run, said, progress)
    saved = await _retrying(
        db(run_finish),
        message_id=message.pk,
        status=status,
        content=content,
        output=message.output,
        metadata=message.metadata,
        model_messages=to_jsonable_python(said) if said is not None else None,
        tool_calls=message.tool_calls,
        approvals=approvals,
        events_seq=events_seq,
    )
    if not saved:
        stored = await db(run_answer_state)(message_id=message.pk)
        if stored is None:
            raise NotFound("The thread was deleted while the answer was being written.")
        if stored != (status, message.metadata):
            raise RunInterrupted()
        # An earlier attempt committed before its connection failed: the answer is saved as it is here.


def _tool_calls(run: Run, said: list[ModelMessage], progress: Progress) -> list[JSON]:
    """The answer's tool calls; those made before it stopped for approval keep the durations measured then."""
    calls = tool_calls_of(said, durations_ms=progress.tools.durations_ms, output_tools=run.spec.output_tools)
    for call, before in zip(calls, run.start.assistant_message.tool_calls or [], strict=False):
        if call["duration_ms"] is None and isinstance(before, dict):
            call["duration_ms"] = before.get("duration_ms")
    return calls


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


ModelStep = Callable[[Run, Progress, Broadcast], Coroutine[object, object, AgentRunResult[object]]]
"""How a run's model answers: whole, or streamed to the run's broadcast as it goes (its progress kept up to date)."""


@dataclass(frozen=True)
class Started:
    """A run that has taken its thread: its caller's backlog of its events, if it listens, and its outcome."""

    turn: Turn
    listener: Backlog | None
    finished: asyncio.Future[APIException | None]
    """The error the run ended with, if any, once its answer is saved (or could not be)."""
    decided: str | None = None
    """For an answer going on after a decision: the status that decision gave its approval."""


# Strong references: a run is a task of its own, held by nothing else once its caller is gone.
_RUNS: set[asyncio.Task] = set()


async def start_run(
    *,
    thread_id: uuid.UUID,
    take: Take,
    answer: ModelStep,
    request_id: str | None = None,
    listen: bool = False,
    awaited: bool = False,
) -> Started | None:
    """Take the thread (see `Take`) and start its run in the background; None when there is nothing to run. Its
    events go to every reader of the thread, and to the backlog of the caller when it listens. Raises before
    anything is written when the run cannot start (see `open_run`).

    A run its caller awaits (a blocking query) does its database work on the request's thread, as the request
    would; any other goes on after its request and must not use its thread.
    """
    started: asyncio.Future[Started | None] = asyncio.get_running_loop().create_future()
    started.add_done_callback(_retrieved)
    # One task from taking the lease to saving the answer: a caller gone even while the lease is being taken
    # leaves a run that answers, not a lease nobody renews or releases.
    task = asyncio.create_task(_open_and_execute(thread_id, take, answer, request_id, listen, awaited, started))
    _RUNS.add(task)
    task.add_done_callback(_RUNS.discard)
    return await asyncio.shield(started)


async def _open_and_execute(
    thread_id: uuid.UUID,
    take: Take,
    answer: ModelStep,
    request_id: str | None,
    listen: bool,
    awaited: bool,
    started: asyncio.Future[Started | None],
) -> None:
    try:
        run = await open_run(thread_id=thread_id, take=take)
    except asyncio.CancelledError:
        started.cancel()
        raise
    except ApprovalLapsed as lapsed:
        # The answer before waits for an approval nobody decided in time: it is finished first.
        finish_lapsed(thread_id, lapsed.message_id)
        started.set_exception(lapsed)
        return
    except Exception as exc:
        started.set_exception(exc)
        return
    if run is None:
        started.set_result(None)
        return
    structured = run.spec.structured
    listener = Backlog(cumulative=structured, max_events=settings.STREAM_BACKLOG_EVENTS) if listen else None
    broadcast = Broadcast(
        thread_id=thread_id,
        run=run.start.assistant_message.seq,
        message_id=run.message_id,
        cumulative=structured,
        first_seq=run.start.first_seq,
        request_id=request_id,
        listener=listener,
    )
    finished: asyncio.Future[APIException | None] = asyncio.get_running_loop().create_future()
    finished.add_done_callback(_retrieved)
    if not started.cancelled():
        started.set_result(Started(run.turn, listener, finished, run.start.decided))
    if not awaited:
        serve_outside_requests()
    try:
        finished.set_result(await execute(run, broadcast, answer))
    finally:
        if not finished.done():
            finished.set_exception(RunInterrupted())
    await broadcast.flushed()


def finish_lapsed(thread_id: uuid.UUID, message_id: uuid.UUID) -> None:
    """Have the answer whose approvals all expired go on, the model told so, in the background (its readers hear of
    it as of a blocking query): it is what holds its thread."""

    def take(label: str) -> RunStart | None:
        return approvals_lapse(
            message_id=message_id,
            lease_seconds=settings.RUN_LEASE_SECONDS,
            history_turns=settings.AGENT_HISTORY_TURNS,
            deps_for=_deps_for,
        )

    async def go_on() -> None:
        with contextlib.suppress(Exception):  # another process took it, or it was finished meanwhile
            await start_run(thread_id=thread_id, take=take, answer=_answer_whole)

    task = asyncio.create_task(go_on(), context=contextvars.Context())
    _RUNS.add(task)
    task.add_done_callback(_RUNS.discard)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # the caller that would have raised it may be gone


async def execute(run: Run, broadcast: Broadcast, answer: ModelStep) -> APIException | None:
    """Have the model answer, until it is done or the run is stopped, and save the answer: complete, incomplete
    (cancelled) or failed. Every path, the server's shutdown included, ends with `done`; the run's failure, if
    any, is sent as an `error` event before it and returned."""
    progress = Progress()
    failure: APIException | None = None
    try:
        if run.start.deferred is None:
            broadcast.emit(message_created(run))
        for approval in run.start.approvals:
            broadcast.emit({"event": "approval_decided", "approval": approval})
        broadcast.emit(message_started(run))
        keep(run, progress)
        try:
            result = await until_stopped(run, answer(run, progress, broadcast))
        except asyncio.CancelledError:
            if run.local.stopped is None:
                raise
            await close_run(
                run,
                progress,
                status=Message.Status.INCOMPLETE,
                content=progress.text,
                output=progress.output,
                cancelled=True,
            )
        except Exception as exc:
            failure = model_failure(exc)
            await close_run(
                run,
                progress,
                status=Message.Status.FAILED,
                content=progress.text,
                output=None,
                error=error_info(failure),
            )
        else:
            usage = usage_metadata(result.usage, run.start.assistant_message.metadata.get("usage"))
            if isinstance(result.output, DeferredToolRequests):
                await _stop_for_approval(run, progress, broadcast, result, usage)
            else:
                await close_run(
                    run,
                    progress,
                    status=Message.Status.COMPLETE,
                    content=final_content(run, result.output),
                    output=result.output,
                    model_messages=result.new_messages(),
                    usage=usage,
                )
        if failure is None:
            broadcast.emit(message_complete(run))
    except asyncio.CancelledError:
        # Stopped from outside (the server shutting down): the answer is left to be marked interrupted.
        failure = RunInterrupted()
        raise
    except Exception as exc:
        failure = as_application_error(exc)
        if not isinstance(exc, ApplicationError):
            logger.exception("Could not save the answer of thread %s", run.start.thread.pk)
    finally:
        # Released first: nothing a reader does with the last events can keep the thread busy.
        release(run)
        if failure is not None:
            broadcast.emit(error_event(failure, message_id=str(run.message_id)))
        broadcast.emit({"event": "done"})
    return failure


async def _stop_for_approval(
    run: Run, progress: Progress, broadcast: Broadcast, result: AgentRunResult[object], usage: JSON
) -> None:
    """Save the answer waiting for the customer's approval of the tool calls the model made, then say so: an
    `approval_required` event for each (before `message_complete` and `done`)."""
    requests = result.output
    assert isinstance(requests, DeferredToolRequests)
    if requests.calls or not requests.approvals:
        raise ModelError("The model asked for tools this service does not run.")
    expires_at = timezone.now() + timedelta(seconds=settings.APPROVAL_TTL_SECONDS)
    calls = [
        PendingCall(uuid.uuid4(), call.tool_name, call.tool_call_id, call.args_as_dict(), expires_at)
        for call in requests.approvals
    ]
    await close_run(
        run,
        progress,
        status=Message.Status.AWAITING_APPROVAL,
        content=progress.text,
        output=None,
        model_messages=result.new_messages(),
        approvals=calls,
        # The seq of the last event it will have sent: one a call, message_complete and done.
        events_seq=broadcast.seq + len(calls) + 2,
        usage=usage,
    )
    for call in calls:
        broadcast.emit({"event": "approval_required", "approval": approval_shape(call)})


def approval_shape(call: PendingCall) -> JSONObject:
    return {"id": str(call.id), "tool": call.tool_name, "args": call.args, "expires_at": call.expires_at.isoformat()}


async def run_blocking(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Turn:
    """Answer `query` and return the saved exchange; a failure is saved, then raised.

    The run goes on if the caller goes away: its answer is saved all the same.
    """
    take = question(user_id=user_id, thread_id=thread_id, query=query)
    started = await start_run(thread_id=thread_id, take=take, answer=_answer_whole, awaited=True)
    assert started is not None, "a question always runs"
    if (failure := await asyncio.shield(started.finished)) is not None:
        raise failure
    return started.turn


async def decide_blocking(
    *, user_id: uuid.UUID, thread_id: uuid.UUID, approval_id: uuid.UUID, approved: bool, note: str
) -> Turn:
    """Record the customer's decision and return the exchange as it then stands: the answer gone on and saved, or
    still waiting for its other approvals. A decision after the approval expired raises ApprovalExpired (the answer
    goes on regardless, the model told it expired)."""
    take = decision(user_id=user_id, thread_id=thread_id, approval_id=approval_id, approved=approved, note=note)
    started = await start_run(thread_id=thread_id, take=take, answer=_answer_whole, awaited=True)
    if started is None:
        return await db(_turn_of)(approval_id=approval_id)
    if started.decided == Approval.Status.EXPIRED:
        raise ApprovalExpired()
    if (failure := await asyncio.shield(started.finished)) is not None:
        raise failure
    return started.turn


def _turn_of(*, approval_id: uuid.UUID) -> Turn:
    answer = Message.objects.select_related("thread").get(approvals__pk=approval_id)
    question = Message.objects.get(thread_id=answer.thread_id, seq=answer.seq - 1)
    return Turn(answer.thread, question, answer)


async def _answer_whole(run: Run, progress: Progress, broadcast: Broadcast) -> AgentRunResult[object]:
    start = run.start
    return await run.spec.agent.run(
        run.query,
        message_history=start.history,
        deferred_tool_results=start.deferred,
        deps=start.deps,
        model=run.model,
        capabilities=[progress.tools],
    )
