"""The streamed answer: model events -> validated partial outputs -> contract events -> the run's broadcast.

The run around it (its lease, its saved answer, its last events) is `runs.runner`'s, as for a blocking query.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from django.conf import settings
from pydantic import ValidationError
from pydantic_ai import Agent, ModelRetry, UnexpectedModelBehavior
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import FunctionToolCallEvent, FunctionToolResultEvent
from pydantic_ai.result import AgentStream
from pydantic_ai.tools import DeferredToolRequests
from pydantic_core import to_jsonable_python

from bankagent.exceptions import ApprovalExpired
from bankagent.jsontypes import JSON
from runs.broadcast import Broadcast
from runs.events import Backlog
from runs.keeper import Progress
from runs.lease import Run, decision, final_content, question
from runs.runner import start_run
from threads.models import Approval

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
    """The partial output so far, or None while there is none that validates (it may not have started yet), or
    the model is calling a tool that waits for the customer's approval (no answer is being written)."""
    try:
        output = await stream.validate_response_output(stream.response, allow_partial=True)
    except (ValidationError, ModelRetry, UnexpectedModelBehavior):
        return None
    return None if isinstance(output, DeferredToolRequests) else output


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


async def stream_answer(run: Run, progress: Progress, broadcast: Broadcast) -> AgentRunResult[object]:
    """Run the agent, emitting text_delta, tool_call and tool_result events as it goes; `progress` holds what it
    has written so far."""
    message_id = str(run.message_id)
    start = run.start
    async with run.spec.agent.iter(
        run.query,
        message_history=start.history,
        deferred_tool_results=start.deferred,
        deps=start.deps,
        model=run.model,
        capabilities=[progress.tools],
        usage_limits=run.usage_limits,
        run_id=run.agent_run_id,
    ) as it:
        async for node in it:
            if Agent.is_model_request_node(node):
                async with node.stream(it.ctx) as stream:
                    async for token in _tokens(stream, run.spec.structured, progress):
                        progress.first_token_at = progress.first_token_at or time.monotonic()
                        broadcast.emit({"event": "text_delta", "message_id": message_id, "token": token})
            elif Agent.is_call_tools_node(node):
                async with node.stream(it.ctx) as tool_events:
                    async for event in tool_events:
                        if isinstance(event, FunctionToolCallEvent):
                            call = {"name": event.part.tool_name, "args": event.part.args_as_dict()}
                            broadcast.emit({"event": "tool_call", "message_id": message_id, "tool_call": call})
                        elif isinstance(event, FunctionToolResultEvent):
                            result = {"name": event.part.tool_name, "content": to_jsonable_python(event.part.content)}
                            broadcast.emit({"event": "tool_result", "message_id": message_id, "tool_result": result})
    result = it.result
    assert result is not None, "a finished agent run has a result"
    if isinstance(result.output, DeferredToolRequests):
        return result  # stopped for the customer's approval: there is no answer yet
    final = final_content(run, result.output)
    if run.spec.structured and final != progress.text:
        # The last token is the whole output, validated as it is saved.
        progress.text = final
        broadcast.emit({"event": "text_delta", "message_id": message_id, "token": final})
    return result


async def start_stream(
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    query: str,
    request_id: str | None = None,
    listen: bool = False,
) -> Backlog | None:
    """Take the thread and start its run, streamed, in the background: its events go to every reader of the
    thread, and to the backlog returned when the caller listens. Raises before anything is written when the run
    cannot start (see `runs.lease.open_run`)."""
    take = question(user_id=user_id, thread_id=thread_id, query=query)
    started = await start_run(
        thread_id=thread_id, take=take, answer=stream_answer, request_id=request_id, listen=listen
    )
    assert started is not None, "a question always runs"
    return started.listener


async def start_decision(
    *,
    user_id: uuid.UUID,
    thread_id: uuid.UUID,
    approval_id: uuid.UUID,
    approved: bool,
    note: str,
    request_id: str | None = None,
    listen: bool = False,
) -> Backlog | None:
    """Record the customer's decision; the answer goes on, streamed to the thread's readers (and to the backlog
    returned when the caller listens), once none of its approvals is pending: None while others are. A decision
    after the approval expired raises ApprovalExpired (the answer goes on regardless, the model told it expired)."""
    take = decision(user_id=user_id, thread_id=thread_id, approval_id=approval_id, approved=approved, note=note)
    started = await start_run(
        thread_id=thread_id, take=take, answer=stream_answer, request_id=request_id, listen=listen
    )
    if started is not None and started.decided == Approval.Status.EXPIRED:
        raise ApprovalExpired()
    return None if started is None else started.listener
