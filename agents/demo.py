"""The offline `demo` model: deterministic, keyless, and good enough to demo the whole service.

It reads the conversation like a model would: it calls the agent's real tools when a question needs them,
answers from their results, remembers what the user said earlier in the history it is given (and in the thread's
summary: it writes those too, keeping what the user said of themselves), and streams its answer in small chunks.
"""

import asyncio
import json
import re
from collections.abc import AsyncIterator

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from agents import demo_script
from agents.summary import SUMMARY_INSTRUCTIONS, SUMMARY_PREFIX

_CHUNK = re.compile(r"\s*\S+|\s+")


def _prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


def _summary(messages: list[ModelMessage]) -> str:
    """The thread's summary the model is shown ahead of the history, if any."""
    for message in messages:
        for part in message.parts if isinstance(message, ModelRequest) else ():
            if isinstance(part, SystemPromptPart) and part.content.startswith(SUMMARY_PREFIX):
                return part.content.removeprefix(SUMMARY_PREFIX)
    return ""


def _tool_returns(messages: list[ModelMessage]) -> dict[str, ToolReturnPart]:
    """Tool results since the latest user prompt, by tool name."""
    returns: dict[str, ToolReturnPart] = {}
    for message in reversed(messages):
        if isinstance(message, ModelRequest):
            if any(isinstance(part, UserPromptPart) for part in message.parts):
                break
            returns.update({p.tool_name: p for p in message.parts if isinstance(p, ToolReturnPart)})
    return returns


def respond(messages: list[ModelMessage], info: AgentInfo) -> list[ModelResponsePart]:
    """Decide the next response: a tool call the question needs, or the answer."""
    prompts = _prompts(messages)
    prompt = prompts[-1] if prompts else ""
    if info.instructions == SUMMARY_INSTRUCTIONS:
        return [TextPart(demo_script.summary(prompt))]
    returns = _tool_returns(messages)
    tools = {tool.name for tool in info.function_tools}
    if not returns and (call := demo_script.tool_for(prompt, tools)):
        return [ToolCallPart(call[0], call[1])]
    context = demo_script.Context(
        prompt=prompt,
        earlier_prompts=prompts[:-1],
        summary=_summary(messages),
        instructions=info.instructions or "",
        tool_results={
            name: (part.content if part.outcome == "success" else None)
            for name, part in returns.items()
            if part.outcome != "denied"
        },
        denied={name: str(part.content) for name, part in returns.items() if part.outcome == "denied"},
    )
    if info.output_tools:
        return [ToolCallPart(info.output_tools[0].name, demo_script.support_answer(context).as_output())]
    return [TextPart(demo_script.chat_answer(context))]


def _chunks(text: str) -> list[str]:
    return _CHUNK.findall(text)


def build_demo_model(*, delay_ms: int) -> FunctionModel:
    delay = max(delay_ms, 0) / 1000

    async def request(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=respond(messages, info))

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        (part,) = respond(messages, info)
        if isinstance(part, TextPart):
            pieces: list[str | DeltaToolCalls] = list(_chunks(part.content))
        else:
            args = json.dumps(part.args, ensure_ascii=False)
            pieces = [{0: DeltaToolCall(name=part.tool_name, tool_call_id=part.tool_call_id)}]
            pieces += [{0: DeltaToolCall(json_args=chunk)} for chunk in _chunks(args)]
        for index, piece in enumerate(pieces):
            if index and delay:
                await asyncio.sleep(delay)
            yield piece

    return FunctionModel(request, stream_function=stream, model_name="demo")
