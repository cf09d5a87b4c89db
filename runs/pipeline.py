"""The streamed run: model events -> validated partial outputs -> contract events -> the run's broadcast,
then its answer saved. It runs as a task of its own, so the run outlives the request or socket that started it.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from django.conf import settings
from pydantic import ValidationError
from pydantic_ai import Agent, ModelRetry, UnexpectedModelBehavior
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import FunctionToolCallEvent, FunctionToolResultEvent
from pydantic_ai.result import AgentStream
from pydantic_core import to_jsonable_python

from agents.llm import model_failure
from bankagent.db import serve_outside_requests
from bankagent.exceptions import ApplicationError, RunInterrupted, as_application_error
from bankagent.jsontypes import JSON
from runs.broadcast import Broadcast
from runs.events import Backlog, Event, error_event
from runs.keeper import Progress
from runs.runner import (
    Run,
    close_complete,
    close_run,
    error_info,
    final_content,
    keep,
    message_complete,
    message_created,
    message_started,
    open_run,
    release,
    until_stopped,
)
from threads.models import Message

logger = logging.getLogger(__name__)


@dataclass
class Streamed(Progress):
    """A streamed run's progress, and its result once the agent is done."""

    result: AgentRunResult[object] | None = None


# Strong references: a run is a task of its own, held by nothing else once its starter is gone.
_RUNS: set[asyncio.Task] = set()


VALIDATE_EVERY_CHUNKS = 4
"""A partial output is validated at least once every this many chunks while chunks keep coming."""


async def _partial_outputs(stream: AgentStream) -> AsyncIterator[JSON]:
    """Validated partial outputs of a structured answer, coalesced: validating costs more than a chunk, so it
    happens every few chunks, and whenever the model has been quiet for STREAM_DEBOUNCE_MS with chunks not yet
    shown. Unlike pydantic-ai's debouncing, nothing wakes up while nothing is waiting to be shown, which matters
    with hundreds of answers streaming at once."""
    chunks = aiter(stream)
    quiet = settings.STREAM_DEBOUNCE_MS / 1000
    waiting = 0
    pull: asyncio.Future | None = None
    try:
        while True:
            pull = pull or asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pull}, timeout=quiet if waiting else None)
            if not done or waiting >= VALIDATE_EVERY_CHUNKS:
                waiting = 0
                if (partial := await _validated(stream)) is not None:
                    yield partial
                if not done:
                    continue
            try:
                pull.result()
            except StopAsyncIteration:
                break
            pull, waiting = None, waiting + 1
    finally:
        if pull is not None and not pull.done():
            pull.cancel()
    if waiting and (partial := await _validated(stream)) is not None:
        yield partial


async def _validated(stream: AgentStream) -> JSON:
    """The partial output so far, or None while there is none that validates (it may not have started yet)."""
    try:
        return await stream.validate_response_output(stream.response, allow_partial=True)
    except (ValidationError, ModelRetry, UnexpectedModelBehavior):
        return None


async def _tokens(stream: AgentStream, structured: bool, progress: Progress) -> AsyncIterator[str]:
    """text_delta tokens: the new text, or the JSON of the validated partial output so far."""
    if not structured:
        async for delta in stream.stream_text(delta=True, debounce_by=None):
            if delta:
                progress.text += delta
                yield delta
        return
    async for partial in _partial_outputs(stream):
        token = json.dumps(partial, ensure_ascii=False)
        # Empty and repeated outputs say nothing new.
        if partial and token != progress.text:
            progress.text, progress.output = token, partial
            yield token


async def agent_events(run: Run, progress: Streamed) -> AsyncIterator[Event]:
    """Run the agent, yielding text_delta, tool_call and tool_result events; its result lands in `progress`."""
    message_id = str(run.message_id)
    start = run.start
    async with run.spec.agent.iter(run.query, message_history=start.history, deps=start.deps, model=run.model) as it:
        async for node in it:
            if Agent.is_model_request_node(node):
                async with node.stream(it.ctx) as stream:
                    async for token in _tokens(stream, run.spec.structured, progress):
                        progress.first_token_at = progress.first_token_at or time.monotonic()
                        yield {"event": "text_delta", "message_id": message_id, "token": token}
            elif Agent.is_call_tools_node(node):
                async with node.stream(it.ctx) as tool_events:
                    async for event in tool_events:
                        if isinstance(event, FunctionToolCallEvent):
                            call = {"name": event.part.tool_name, "args": event.part.args_as_dict()}
                            yield {"event": "tool_call", "message_id": message_id, "tool_call": call}
                        elif isinstance(event, FunctionToolResultEvent):
                            result = {"name": event.part.tool_name, "content": to_jsonable_python(event.part.content)}
                            yield {"event": "tool_result", "message_id": message_id, "tool_result": result}
    progress.result = it.result


async def start_stream(
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    query: str,
    request_id: str | None = None,
    listen: bool = False,
) -> Backlog | None:
    """Take the thread and start its run in the background. Its events go to every reader of the thread, and
    to the backlog returned when the caller listens.

    Raises before anything is written when the run cannot start (see `open_run`).
    """
    started: asyncio.Future[Backlog | None] = asyncio.get_running_loop().create_future()
    started.add_done_callback(_retrieved)
    # One task from taking the lease to saving the answer: a caller gone even while the lease is being taken
    # leaves a run that answers, not a lease nobody renews or releases.
    task = asyncio.create_task(_open_and_execute(user_id, thread_id, query, request_id, listen, started))
    _RUNS.add(task)
    task.add_done_callback(_RUNS.discard)
    return await asyncio.shield(started)


async def _open_and_execute(
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    query: str,
    request_id: str | None,
    listen: bool,
    started: asyncio.Future[Backlog | None],
) -> None:
    try:
        run = await open_run(user_id=user_id, thread_id=thread_id, query=query)
    except asyncio.CancelledError:
        started.cancel()
        raise
    except Exception as exc:
        started.set_exception(exc)
        return
    structured = run.spec.structured
    listener = Backlog(cumulative=structured, max_events=settings.STREAM_BACKLOG_EVENTS) if listen else None
    broadcast = Broadcast(thread_id=thread_id, cumulative=structured, request_id=request_id, listener=listener)
    if not started.cancelled():
        started.set_result(listener)
    # The lease was taken as part of the request; the run outlives it, and must not use its thread.
    serve_outside_requests()
    await execute(run, broadcast)


def _retrieved(started: asyncio.Future[Backlog | None]) -> None:
    if not started.cancelled():
        started.exception()  # the caller that would have raised it may be gone


async def execute(run: Run, broadcast: Broadcast) -> None:
    """Stream the run to its end, or until it is stopped, and save its answer; every path ends with `done`."""
    progress = Streamed()
    try:
        broadcast.emit(message_created(run))
        broadcast.emit(message_started(run))
        keep(run, progress)
        try:
            await until_stopped(run, _consume(run, progress, broadcast))
        except asyncio.CancelledError:
            if run.local.stopped is None:
                raise
            await close_run(
                run,
                status=Message.Status.INCOMPLETE,
                content=progress.text,
                output=progress.output,
                cancelled=True,
                **_timing(run, progress),
            )
        except Exception as exc:
            error = model_failure(exc)
            await close_run(
                run,
                status=Message.Status.FAILED,
                content=progress.text,
                output=None,
                error=error_info(error),
                **_timing(run, progress),
            )
            broadcast.emit(error_event(error, message_id=str(run.message_id)))
            return
        else:
            result = progress.result
            assert result is not None, "a finished agent run has a result"
            final = final_content(run, result.output)
            if run.spec.structured and final != progress.text:
                # The last token is the whole output, validated as it is saved.
                progress.text = final
                broadcast.emit({"event": "text_delta", "message_id": str(run.message_id), "token": final})
            await close_complete(run, result, **_timing(run, progress))
        broadcast.emit(message_complete(run))
    except ApplicationError as error:
        broadcast.emit(error_event(error, message_id=str(run.message_id)))
    except Exception as exc:
        # Whatever failed, the readers must not wait for a `done` that never comes.
        logger.exception("Could not save the answer of thread %s", run.start.thread.pk)
        broadcast.emit(error_event(as_application_error(exc), message_id=str(run.message_id)))
    finally:
        # Released first: nothing a reader does with the last events can keep the thread busy.
        release(run)
        if (task := asyncio.current_task()) is not None and task.cancelling():
            # Stopped from outside (the server shutting down): the answer is left to be marked interrupted.
            broadcast.emit(error_event(RunInterrupted(), message_id=str(run.message_id)))
        broadcast.emit({"event": "done"})
        await broadcast.flushed()


async def _consume(run: Run, progress: Streamed, broadcast: Broadcast) -> None:
    async for event in agent_events(run, progress):
        broadcast.emit(event)


def _timing(run: Run, progress: Progress) -> dict[str, int]:
    if progress.first_token_at is None:
        return {}
    return {"time_to_first_token_ms": round((progress.first_token_at - run.started) * 1000)}
