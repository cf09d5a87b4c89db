"""The streaming core: one run feeds the contract's events to every transport.

model events -> validated partial outputs -> contract events -> persistence -> sinks (the HTTP response that
started the run, and the thread's channel-layer group for every websocket on it).
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import FunctionToolCallEvent, FunctionToolResultEvent
from pydantic_ai.result import AgentStream
from pydantic_core import to_jsonable_python

from agents.llm import model_failure
from agents.runner import RunSetup, finish_complete, finish_failed, finish_incomplete, lease_kept
from bankagent.exceptions import ApplicationError

logger = logging.getLogger(__name__)

Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None]]


@dataclass
class Progress:
    """What a run has produced so far, kept so that a cancelled or failed run can save it."""

    structured: bool
    text: str = ""
    """The answer so far: accumulated text, or the JSON of the latest partial output."""
    output: dict[str, Any] | None = None
    first_token_at: float | None = None
    result: Any = None


async def _tokens(stream: AgentStream, progress: Progress) -> AsyncIterator[str]:
    """text_delta tokens: the new text, or the JSON of the validated partial output so far."""
    if not progress.structured:
        async for delta in stream.stream_text(delta=True, debounce_by=None):
            if delta:
                progress.text += delta
                yield delta
        return
    # Partial outputs that fail validation are skipped by pydantic-ai; empty and repeated ones by us.
    async for partial in stream.stream_output(debounce_by=None):
        token = json.dumps(partial, ensure_ascii=False)
        if partial and token != progress.text:
            progress.text, progress.output = token, partial
            yield token


async def agent_events(setup: RunSetup, progress: Progress) -> AsyncIterator[Event]:
    """Run the agent, yielding text_delta, tool_call and tool_result events; the result lands in `progress`."""
    message_id = str(setup.turn.assistant_message.id)
    agent = setup.spec.agent
    async with agent.iter(setup.query, message_history=setup.history, deps=setup.deps, model=setup.model) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as stream:
                    async for token in _tokens(stream, progress):
                        progress.first_token_at = progress.first_token_at or time.monotonic()
                        yield {"event": "text_delta", "message_id": message_id, "token": token}
            elif Agent.is_call_tools_node(node):
                async with node.stream(run.ctx) as tool_events:
                    async for event in tool_events:
                        if isinstance(event, FunctionToolCallEvent):
                            call = {"name": event.part.tool_name, "args": event.part.args_as_dict()}
                            yield {"event": "tool_call", "message_id": message_id, "tool_call": call}
                        elif isinstance(event, FunctionToolResultEvent):
                            result = {"name": event.part.tool_name, "content": to_jsonable_python(event.part.content)}
                            yield {"event": "tool_result", "message_id": message_id, "tool_result": result}
    progress.result = run.result


def error_event(error: ApplicationError, **extra: Any) -> Event:
    """The contract's error event: the same code and message as the HTTP error, under the seed's names."""
    event: Event = {"event": "error", "error": error.message, "error_type": error.code, **extra}
    if error.details:
        event["details"] = error.details
    return event


def _timing(setup: RunSetup, progress: Progress) -> dict[str, int]:
    if progress.first_token_at is None:
        return {}
    return {"time_to_first_token_ms": round((progress.first_token_at - setup.started) * 1000)}


async def execute(setup: RunSetup, emit: Emit, cancelled: asyncio.Event) -> None:
    """Run to the end, or until `cancelled` is set, emitting every event and saving the answer."""
    message_id = str(setup.turn.assistant_message.id)
    user = setup.turn.user_message
    await emit({"event": "message_created", "message": {"id": str(user.id), "role": "user", "content": user.content}})
    await emit({"event": "message_started", "message_id": message_id})
    progress = Progress(structured=setup.spec.structured)

    async def consume() -> None:
        async for event in agent_events(setup, progress):
            await emit(event)

    async with lease_kept(setup):
        model_task = asyncio.create_task(consume())
        stop_task = asyncio.create_task(cancelled.wait())
        try:
            await asyncio.wait({model_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            if not model_task.done():
                model_task.cancel()
                await asyncio.gather(model_task, return_exceptions=True)
        try:
            await _save(setup, progress, model_task, emit)
        except Exception:
            # Whatever failed, the clients must not wait for a `done` that never comes.
            logger.exception("Could not save the answer of thread %s", setup.turn.thread.pk)
            await emit(error_event(ApplicationError(), message_id=message_id))
            await emit({"event": "done"})


async def _save(setup: RunSetup, progress: Progress, model_task: asyncio.Task, emit: Emit) -> None:
    message_id = str(setup.turn.assistant_message.id)
    timing = _timing(setup, progress)
    if model_task.cancelled():
        await finish_incomplete(setup, content=progress.text, output=progress.output, cancelled=True, **timing)
    elif (exc := model_task.exception()) is not None:
        error = model_failure(exc)
        await finish_failed(setup, error=error, content=progress.text, **timing)
        await emit(error_event(error, message_id=message_id))
        await emit({"event": "done"})
        return
    else:
        result = progress.result
        await finish_complete(
            setup, output=result.output, new_messages=result.new_messages(), usage=result.usage, **timing
        )
    await emit({"event": "message_complete", "message_id": message_id})
    await emit({"event": "done"})
