"""A run's lease, the answer it writes: taking the thread (for a new question, or for an answer that goes on after
the customer's decision), keeping it while the model answers, letting go of it, and saving the answer.

`open_run` takes one of the process's run slots, makes the run reachable by cancels and, in one hop to the database,
takes the thread's lease; `close_run` saves the answer in one statement, which releases the thread.
"""

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone
from pydantic_ai import capture_run_messages
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, ToolReturnPart
from pydantic_ai.models import Model
from pydantic_ai.usage import RunUsage, UsageLimits
from pydantic_core import to_jsonable_python

from agents.llm import agent_model, model_label
from agents.registry import AgentSpec, agent_spec
from bankagent.db import db
from bankagent.exceptions import ApplicationError, NotFound, RunInterrupted
from bankagent.jsontypes import JSON, JSONObject
from runs.approvals import approval_decide
from runs.events import Event
from runs.hub import LocalRun, hub
from runs.keeper import Progress, keeper
from runs.limits import model_turns, slots
from runs.selectors import run_answer_state
from runs.services import PendingCall, RunStart, run_begin, run_finish
from runs.spending import Spending, budget_check
from runs.tools import tool_calls_of
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
    start: RunStart
    local: LocalRun
    started: float
    agent_run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    """pydantic-ai's id of the run: the messages it adds carry it."""
    said: list[ModelMessage] = field(default_factory=list)
    """The messages of the model's run (those of the history before them), kept even when it fails."""

    @property
    def query(self) -> str | None:
        return self.start.query

    @property
    def usage_limits(self) -> UsageLimits:
        return UsageLimits(
            request_limit=settings.AGENT_MAX_REQUESTS,
            tool_calls_limit=settings.AGENT_MAX_TOOL_CALLS,
            output_tokens_limit=settings.AGENT_MAX_OUTPUT_TOKENS,
        )

    @property
    def turn(self) -> Turn:
        return Turn(self.start.thread, self.start.user_message, self.start.assistant_message)

    @property
    def message_id(self) -> uuid.UUID:
        return self.start.assistant_message.pk


def deps_for(agent_type: str, user_id: uuid.UUID) -> object:
    return agent_spec(agent_type).deps_for(user_id)


Take = Callable[[str], RunStart | None]
"""Takes the thread's lease in the database for a run of the model named, saving what the run starts with; None
when there is nothing to run (a decision that leaves other approvals pending)."""


def question(*, user_id: uuid.UUID, thread_id: uuid.UUID, query: str) -> Take:
    """Taking the thread for a new question: the question saved with the answer the run will fill."""

    def take(label: str) -> RunStart:
        budget_check(user_id=user_id, daily_tokens=settings.USER_DAILY_TOKENS, now=timezone.now())
        return run_begin(
            thread_id=thread_id,
            user_id=user_id,
            query=query,
            model_label=label,
            lease_seconds=settings.RUN_LEASE_SECONDS,
            history_turns=settings.AGENT_HISTORY_TURNS,
            deps_for=deps_for,
        )

    return take


def decision(*, user_id: uuid.UUID, thread_id: uuid.UUID, approval_id: uuid.UUID, approved: bool, note: str) -> Take:
    """Taking the thread for an answer that goes on after the customer's decision (see `approval_decide`)."""

    def take(label: str) -> RunStart | None:
        budget_check(user_id=user_id, daily_tokens=settings.USER_DAILY_TOKENS, now=timezone.now())
        return approval_decide(
            thread_id=thread_id,
            user_id=user_id,
            approval_id=approval_id,
            approved=approved,
            note=note,
            lease_seconds=settings.RUN_LEASE_SECONDS,
            history_turns=settings.AGENT_HISTORY_TURNS,
            deps_for=deps_for,
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
            with capture_run_messages() as said:
                run.said = said
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


@dataclass(frozen=True)
class Spent:
    """What a run's model requests used."""

    usage: RunUsage
    cost: Decimal | None
    """Estimated, in USD (genai-prices, through pydantic-ai); None when the price of a model that answered is
    unknown, as the demo model's is."""


def spent(run: Run, usage: RunUsage | None = None) -> Spent:
    """What the run used, from the messages it added (a run that failed or was cancelled too); `usage`, pydantic-ai's
    own count of a run that finished, when there is one."""
    own = [message for message in run.said if message.run_id == run.agent_run_id]
    responses = [message for message in own if isinstance(message, ModelResponse)]
    if usage is None:
        usage = RunUsage(requests=len(responses))
        for response in responses:
            usage.incr(response.usage)
        usage.tool_calls = sum(
            isinstance(part, ToolReturnPart) and part.tool_name not in run.spec.output_tools
            for message in own
            if isinstance(message, ModelRequest)
            for part in message.parts
        )
    costs = [response.usage.cost for response in responses]
    return Spent(usage, None if None in costs else sum(costs, Decimal(0)))


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


def cost_metadata(cost: Decimal | None, before: JSONObject) -> str | None:
    """The answer's estimated cost in USD as a decimal string, added to what it cost before it stopped for approval;
    None when any of it is unknown."""
    earlier = before.get("cost") if "usage" in before else "0"
    if cost is None or not isinstance(earlier, str):
        return None
    return f"{cost + Decimal(earlier):f}"


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
    used: Spent | None = None,
    **metadata: JSON,
) -> None:
    """Save the run's answer (with what it said before, if it went on after an approval), or the answer stopped to
    wait for `approvals`, retrying after a transient database error; what the run `used` goes in its metadata and to
    its user's day. Raises NotFound (the thread was deleted meanwhile) or RunInterrupted (another run took the lapsed
    lease over): the answer is then discarded."""
    message = run.start.assistant_message
    spending = None
    if used is not None:
        metadata["usage"] = usage_metadata(used.usage, message.metadata.get("usage"))
        metadata["cost"] = cost_metadata(used.cost, message.metadata)
        if used.usage.requests:
            tokens = used.usage.input_tokens, used.usage.output_tokens
            spending = Spending(run.start.thread.user_id, *tokens, used.cost)
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
        spending=spending,
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


def approval_shape(call: PendingCall) -> JSONObject:
    return {"id": str(call.id), "tool": call.tool_name, "args": call.args, "expires_at": call.expires_at.isoformat()}
