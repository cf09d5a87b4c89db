"""Run a thread's agent on its stored history and persist the exchange: the one path every entry point takes."""

import json
import time
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
from threads.services import turn_finish, turn_start


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
    """What answered, as configured: "demo", "openai:gpt-4o", ..."""
    deps: Any
    history: list[ModelMessage]
    turn: Turn
    started: float


def _begin(*, thread: Thread, query: str) -> tuple[list[ModelMessage], Message, Message]:
    history = thread_history(thread=thread, turns=settings.AGENT_HISTORY_TURNS)
    user_message, assistant_message = turn_start(thread=thread, query=query)
    return history, user_message, assistant_message


async def prepare_run(*, thread: Thread, query: str) -> RunSetup:
    """Resolve agent and model (a misconfiguration writes nothing), then save the user's message."""
    spec = agent_spec(thread.agent_type)
    model = agent_model()
    deps = await spec.deps_for(str(thread.user_id))
    history, user_message, assistant_message = await sync_to_async(_begin)(thread=thread, query=query)
    turn = Turn(thread=thread, user_message=user_message, assistant_message=assistant_message)
    label = settings.AGENT_MODEL if isinstance(settings.AGENT_MODEL, str) else model.model_name
    return RunSetup(
        spec=spec, model=model, model_label=label, deps=deps, history=history, turn=turn, started=time.monotonic()
    )


def usage_metadata(usage: RunUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "requests": usage.requests,
        "tool_calls": usage.tool_calls,
    }


def _run_metadata(setup: RunSetup, **extra: Any) -> dict[str, Any]:
    duration_ms = round((time.monotonic() - setup.started) * 1000)
    return {"model": setup.model_label, "duration_ms": duration_ms, **extra}


async def finish_complete(
    setup: RunSetup, *, output: Any, new_messages: list[ModelMessage], usage: RunUsage, **metadata: Any
) -> Message:
    structured = setup.spec.structured
    return await sync_to_async(turn_finish)(
        message=setup.turn.assistant_message,
        status=Message.Status.COMPLETE,
        content=json.dumps(output, ensure_ascii=False) if structured else output,
        output=output if structured else None,
        metadata=_run_metadata(setup, usage=usage_metadata(usage), **metadata),
        model_messages=to_jsonable_python(new_messages),
    )


async def finish_failed(setup: RunSetup, *, error: ApplicationError, content: str = "", **metadata: Any) -> Message:
    return await sync_to_async(turn_finish)(
        message=setup.turn.assistant_message,
        status=Message.Status.FAILED,
        content=content,
        output=None,
        metadata=_run_metadata(setup, error={"code": error.code, "message": error.message}, **metadata),
    )


async def run_query(*, thread: Thread, query: str) -> Turn:
    """Answer `query` on `thread` and return the saved exchange; a model failure is saved, then raised."""
    setup = await prepare_run(thread=thread, query=query)
    try:
        result = await setup.spec.agent.run(query, message_history=setup.history, deps=setup.deps, model=setup.model)
    except Exception as exc:
        error = model_failure(exc)
        await finish_failed(setup, error=error)
        raise error from exc
    await finish_complete(setup, output=result.output, new_messages=result.new_messages(), usage=result.usage)
    return setup.turn
