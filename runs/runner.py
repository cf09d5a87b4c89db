"""A run from its question to its saved answer: the one path every entry point takes.

`start_run` starts the run in a task of its own, which outlives whoever asked: it takes the thread (`runs.lease`),
then `execute` has the model answer (whole for `run_blocking` and `decide_blocking`, streamed for `runs.pipeline`),
saves the answer, and ends every run alike, with `done`. A run that calls a tool needing the customer's approval
stops, saved `awaiting_approval`, and goes on once they decide. Once an answer is saved, the thread's summary of the
exchanges that left the model's history window is brought up to date in the background (`runs.summaries`).
"""

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import ModelResponse
from pydantic_ai.tools import DeferredToolRequests
from rest_framework.exceptions import APIException

from agents.llm import answered_by, model_failure
from agents.summary import summary_shown
from bankagent import context, telemetry
from bankagent.db import db, serve_outside_requests
from bankagent.exceptions import (
    ApplicationError,
    ApprovalExpired,
    ApprovalLapsed,
    ModelError,
    RunInterrupted,
    as_application_error,
)
from bankagent.metrics import record_run_ended, record_run_started, record_tokens
from runs.approvals import approvals_lapse
from runs.broadcast import Broadcast
from runs.events import Backlog, error_event
from runs.keeper import Progress
from runs.lease import (
    Run,
    Spent,
    Take,
    Turn,
    approval_shape,
    close_run,
    decision,
    deps_for,
    error_info,
    final_content,
    keep,
    message_complete,
    message_created,
    message_started,
    open_run,
    question,
    release,
    spent,
    until_stopped,
)
from runs.services import PendingCall, RunStart
from runs.summaries import summary_after_answer
from runs.sweeper import ensure_sweeper
from threads.models import Approval, Message

logger = logging.getLogger(__name__)


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
    context.bind(thread_id=thread_id)
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
    ensure_sweeper(finish_lapsed)
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
    with telemetry.run_span(run, finished):
        context.bind(run_id=run.message_id, user_id=run.start.thread.user_id)
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
            deps_for=deps_for,
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
    record_run_started(run)
    try:
        if run.start.deferred is None:
            broadcast.emit(message_created(run))
        for approval in run.start.approvals:
            broadcast.emit({"event": "approval_decided", "approval": approval})
        broadcast.emit(message_started(run))
        keep(run, progress)
        try:
            with summary_shown(run.start.thread.summary):
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
                used=spent(run),
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
                used=spent(run),
                error=error_info(failure),
            )
        else:
            used = spent(run, result.usage)
            record_tokens(run, used.usage)
            if isinstance(result.output, DeferredToolRequests):
                await _stop_for_approval(run, progress, broadcast, result, used)
            else:
                await close_run(
                    run,
                    progress,
                    status=Message.Status.COMPLETE,
                    content=final_content(run, result.output),
                    output=result.output,
                    model_messages=result.new_messages(),
                    used=used,
                    model=answered_by(run.model, _last_response(result)),
                )
                summary_after_answer(thread_id=run.start.thread.pk, answer_seq=run.start.assistant_message.seq)
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
        record_run_ended(run, progress, failure)
        if failure is not None:
            broadcast.emit(error_event(failure, message_id=str(run.message_id)))
        broadcast.emit({"event": "done"})
    return failure


def _last_response(result: AgentRunResult[object]) -> ModelResponse | None:
    return next((m for m in reversed(result.new_messages()) if isinstance(m, ModelResponse)), None)


async def _stop_for_approval(
    run: Run, progress: Progress, broadcast: Broadcast, result: AgentRunResult[object], used: Spent
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
        used=used,
        model=answered_by(run.model, _last_response(result)),
    )
    for call in calls:
        broadcast.emit({"event": "approval_required", "approval": approval_shape(call)})


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
        usage_limits=run.usage_limits,
        run_id=run.agent_run_id,
    )
