"""Run a thread's agent on its stored history and persist the exchange: the one path every entry point takes.

`prepare_run` takes the thread's run lease and saves the user's message; `run_query` (blocking) and
`agents.streaming` (NDJSON and websockets) then run the model and end with one of the `finish_*` functions.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from pydantic_ai.usage import RunUsage
from pydantic_core import to_jsonable_python

from agents.llm import agent_model, model_failure
from agents.registry import AgentSpec, agent_spec
from bankagent.exceptions import ApplicationError
from threads.models import Message, Thread
from threads.selectors import thread_history
from threads.services import run_heartbeat, turn_finish, turn_start

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message and the assistant's answer to it."""

    thread: Thread
    user_message: Message
    assistant_message: Message


@dataclass
class RunSetup:
    """Everything a run needs, gathered (and the user's message saved) before the model is called."""

    spec: AgentSpec
    model: Model
    model_label: str
    """What answers, as configured: "demo", "openai:gpt-4o", ..."""
    deps: Any
    history: list[ModelMessage]
    query: str
    turn: Turn
    run_token: uuid.UUID
    started: float


def _begin(*, thread: Thread, query: str, run_token: uuid.UUID) -> tuple[list[ModelMessage], Message, Message]:
    history = thread_history(thread=thread, turns=settings.AGENT_HISTORY_TURNS)
    user_message, assistant_message = turn_start(
        thread=thread, query=query, run_token=run_token, lease_seconds=settings.RUN_LEASE_SECONDS
    )
    return history, user_message, assistant_message


async def prepare_run(*, thread: Thread, query: str) -> RunSetup:
    """Resolve agent and model, take the thread's lease and save the user's message.

    A misconfiguration or a busy thread raises before anything is written.
    """
    spec = agent_spec(thread.agent_type)
    model = agent_model()
    deps = await spec.deps_for(str(thread.user_id))
    run_token = uuid.uuid4()
    history, user_message, assistant_message = await sync_to_async(_begin)(
        thread=thread, query=query, run_token=run_token
    )
    return RunSetup(
        spec=spec,
        model=model,
        model_label=settings.AGENT_MODEL if isinstance(settings.AGENT_MODEL, str) else model.model_name,
        deps=deps,
        history=history,
        query=query,
        turn=Turn(thread=thread, user_message=user_message, assistant_message=assistant_message),
        run_token=run_token,
        started=time.monotonic(),
    )


@contextlib.asynccontextmanager
async def lease_kept(setup: RunSetup) -> AsyncIterator[None]:
    """Renew the thread's run lease while the body runs."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(settings.RUN_LEASE_SECONDS / 3)
            if not await sync_to_async(run_heartbeat)(thread_id=setup.turn.thread.pk, run_token=setup.run_token):
                logger.warning("Run on thread %s lost its lease", setup.turn.thread.pk)

    heart = asyncio.create_task(beat())
    try:
        yield
    finally:
        heart.cancel()


def usage_metadata(usage: RunUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
    }


async def _finish(
    setup: RunSetup,
    *,
    status: str,
    content: str,
    output: Any,
    model_messages: list[Any] | None = None,
    **fields: Any,
) -> Message:
    metadata = {"model": setup.model_label, "duration_ms": round((time.monotonic() - setup.started) * 1000)}
    return await sync_to_async(turn_finish)(
        message=setup.turn.assistant_message,
        run_token=setup.run_token,
        status=status,
        content=content,
        output=output if setup.spec.structured else None,
        metadata=metadata | fields,
        model_messages=model_messages,
    )


async def finish_complete(
    setup: RunSetup, *, output: Any, new_messages: list[ModelMessage], usage: RunUsage, **metadata: Any
) -> Message:
    content = json.dumps(output, ensure_ascii=False) if setup.spec.structured else output
    return await _finish(
        setup,
        status=Message.Status.COMPLETE,
        content=content,
        output=output,
        usage=usage_metadata(usage),
        model_messages=to_jsonable_python(new_messages),
        **metadata,
    )


async def finish_incomplete(setup: RunSetup, *, content: str, output: Any, **metadata: Any) -> Message:
    """A run stopped before its end (cancelled): keep what was produced. It does not enter the history."""
    return await _finish(setup, status=Message.Status.INCOMPLETE, content=content, output=output, **metadata)


async def finish_failed(setup: RunSetup, *, error: ApplicationError, content: str = "", **metadata: Any) -> Message:
    error_info = {"code": error.code, "message": error.message}
    return await _finish(
        setup, status=Message.Status.FAILED, content=content, output=None, error=error_info, **metadata
    )


async def run_query(*, thread: Thread, query: str) -> Turn:
    """Answer `query` on `thread` and return the saved exchange; a model failure is saved, then raised."""
    setup = await prepare_run(thread=thread, query=query)
    try:
        async with lease_kept(setup):
            result = await setup.spec.agent.run(
                query, message_history=setup.history, deps=setup.deps, model=setup.model
            )
    except Exception as exc:
        error = model_failure(exc)
        await finish_failed(setup, error=error)
        raise error from exc
    await finish_complete(setup, output=result.output, new_messages=result.new_messages(), usage=result.usage)
    return setup.turn
