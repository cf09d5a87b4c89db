"""The tools an answer used, as the conversation keeps them: each call with its arguments, its result, how it ended
and how long it ran."""

import time
from dataclasses import dataclass, field

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.tools import ToolDefinition
from pydantic_core import to_jsonable_python

from bankagent.jsontypes import JSON, JSONObject


@dataclass
class ToolTimer(AbstractCapability[object]):
    """How long each tool call of a run took to execute, by call id (its wait for an approval not counted)."""

    durations_ms: dict[str, int] = field(default_factory=dict)

    async def wrap_tool_execute(
        self,
        ctx: RunContext[object],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: object,
        handler: object,
    ) -> object:
        started = time.monotonic()
        try:
            return await handler(args)  # type: ignore[operator]
        finally:
            self.durations_ms[call.tool_call_id] = round((time.monotonic() - started) * 1000)


def tool_calls_of(
    messages: list[ModelMessage], *, durations_ms: dict[str, int], output_tools: frozenset[str]
) -> list[JSON]:
    """The answer's tool calls, in the order the model made them: `{name, args, result, outcome, duration_ms}`,
    the result whole (a denied or failed call's is what the model was told). Output tools are not tools used."""
    returns = {
        part.tool_call_id: part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }
    calls: list[JSON] = []
    for message in messages:
        if not isinstance(message, ModelResponse):
            continue
        for part in message.parts:
            if not isinstance(part, ToolCallPart) or part.tool_name in output_tools:
                continue
            returned = returns.get(part.tool_call_id)
            call: JSONObject = {"name": part.tool_name, "args": part.args_as_dict()}
            call["result"] = None if returned is None else to_jsonable_python(returned.content)
            call["outcome"] = "pending" if returned is None else returned.outcome
            call["duration_ms"] = durations_ms.get(part.tool_call_id)
            calls.append(call)
    return calls
