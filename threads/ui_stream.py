"""The AI SDK's UI message stream (`useChat`) on the service's own threads.

The request is the AI SDK's `useChat` request, of which only the new question is taken: the thread's saved
history is what the model sees. The run is the service's own (`runs.pipeline.start_stream`: its lease, its saved
answer, its readers), and its contract events are translated here into the AI SDK's chunks, using pydantic-ai's
models of both.
"""

import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_ai.ui.vercel_ai.request_types import (
    SubmitMessage,
    TextUIPart,
    ToolApprovalResponded,
    ToolApprovalRespondedPart,
)
from pydantic_ai.ui.vercel_ai.response_types import (
    BaseChunk,
    DataChunk,
    DoneChunk,
    ErrorChunk,
    FinishChunk,
    FinishReason,
    StartChunk,
    TextDeltaChunk,
    TextEndChunk,
    TextStartChunk,
    ToolApprovalRequestChunk,
    ToolInputAvailableChunk,
    ToolOutputAvailableChunk,
)

from bankagent.exceptions import NotAnObject
from bankagent.jsontypes import JSON
from runs.events import Event

SDK_VERSION = 6
"""The AI SDK UI version whose chunks are sent: 6 is the first with tool approval chunks."""

HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

SPOKEN_FIELDS = {"bank_support": "support_advice"}
"""For a structured agent, the field of its output that is its answer's text, streamed as text; the whole output
comes at the end as a `data-output` part."""

FINISH_REASONS: dict[str, FinishReason] = {
    "complete": "stop",
    "awaiting_approval": "tool-calls",
    "incomplete": "other",
}


class InvalidUIRequest(NotAnObject):
    default_detail = (
        "The body must be the AI SDK's useChat request (trigger submit-message) ending with exactly one new user "
        "message of text parts."
    )


@dataclass(frozen=True)
class UIDecision:
    """The customer's answer to an approval the stream asked for, as the AI SDK sends it back: the assistant
    message's tool part in state `approval-responded`."""

    approval_id: uuid.UUID
    approved: bool
    reason: str
    tool_call_id: str
    tool: str


def new_turn(body: object) -> str | UIDecision:
    """What the request asks: the text of its one new user message (the user messages after the last answer, which
    must be one, of text parts only), or, when it ends with the answer instead, the decision that answer's tool part
    carries. Everything else the client sent (earlier messages, system prompts) is ignored."""
    if not isinstance(body, dict):
        raise InvalidUIRequest()
    try:
        request = SubmitMessage.model_validate(body)
    except ValidationError as exc:
        fields = sorted({".".join(map(str, error["loc"])) for error in exc.errors(include_url=False)})[:10]
        raise InvalidUIRequest(details={"fields": fields}) from exc
    if request.messages and request.messages[-1].role == "assistant":
        return _decision(request.messages[-1].parts)
    new = []
    for message in reversed(request.messages):
        if message.role == "assistant":
            break
        if message.role == "user":
            new.append(message)
    if len(new) != 1:
        raise InvalidUIRequest(details={"new_user_messages": len(new)})
    parts = new[0].parts
    if not parts or not all(isinstance(part, TextUIPart) for part in parts):
        raise InvalidUIRequest("The new user message must have text parts, and only text parts.")
    return "\n".join(part.text for part in parts if isinstance(part, TextUIPart))


def _decision(parts: list[object]) -> UIDecision:
    responded = [
        part
        for part in parts
        if isinstance(part, ToolApprovalRespondedPart) and isinstance(part.approval, ToolApprovalResponded)
    ]
    if len(responded) != 1:
        raise InvalidUIRequest(
            "A request ending with the assistant's message must carry one tool part answered "
            "(state approval-responded).",
            details={"approval_responses": len(responded)},
        )
    part = responded[0]
    approval = part.approval
    assert isinstance(approval, ToolApprovalResponded)
    try:
        approval_id = uuid.UUID(approval.id)
    except ValueError as exc:
        raise InvalidUIRequest("The approval's id is not one this service gave.") from exc
    return UIDecision(
        approval_id=approval_id,
        approved=approval.approved,
        reason=approval.reason or "",
        tool_call_id=part.tool_call_id,
        tool=part.type.removeprefix("tool-"),
    )


class ChunkTranslator:
    """One run's contract events as AI SDK chunks.

    The contract's tool events carry no call id: a call's id is made here, and its result (or its approval) is
    matched to the earliest call of the same tool still waiting for one, as the run reports them in order.
    """

    def __init__(self, *, spoken_field: str | None, structured: bool, decided: UIDecision | None = None) -> None:
        """`decided`: the stream goes on after that decision, whose call the client knows by its id already."""
        self.structured = structured
        self.decided = decided
        # Ids of calls after a decision must differ from those of the stream that stopped for it.
        self.call_prefix = "" if decided is None else f"{decided.approval_id}-"
        self.spoken_field = spoken_field
        self.message_id = ""
        self.text_id: str | None = None
        self.texts = 0
        self.spoken = ""
        self.calls = 0
        self.waiting: dict[str, deque[str]] = {}
        self.finish_reason: FinishReason = None
        self.status = ""

    def chunks(self, event: Event) -> Iterator[BaseChunk]:
        name = event["event"]
        if name == "message_started":
            self.message_id = str(event["message_id"])
            yield StartChunk(message_id=self.message_id)
        elif name == "text_delta":
            if delta := self._new_text(str(event["token"])):
                if self.text_id is None:
                    self.texts += 1
                    self.text_id = f"{self.message_id}-text-{self.texts}"
                    yield TextStartChunk(id=self.text_id)
                yield TextDeltaChunk(id=self.text_id, delta=delta)
        elif name == "tool_call":
            yield from self._text_end()
            call = event["tool_call"]
            assert isinstance(call, dict)
            yield self._call(str(call["name"]), call.get("args"))
        elif name == "tool_result":
            result = event["tool_result"]
            assert isinstance(result, dict)
            tool = str(result["name"])
            if not self.waiting.get(tool):
                yield self._call(tool, None)
            yield ToolOutputAvailableChunk(tool_call_id=self.waiting[tool].popleft(), output=result.get("content"))
        elif name == "approval_required":
            approval = event["approval"]
            assert isinstance(approval, dict)
            tool = str(approval["tool"])
            if not self.waiting.get(tool):
                yield self._call(tool, approval.get("args"))
            call_id = self.waiting[tool].popleft()
            yield ToolApprovalRequestChunk(approval_id=str(approval["id"]), tool_call_id=call_id)
            yield DataChunk(type="data-approval", id=call_id, data=approval)
        elif name == "message_complete":
            yield from self._text_end()
            self.status = str(event["status"])
            self.finish_reason = FINISH_REASONS.get(self.status, "other")
            if self.structured and event.get("output") is not None:
                yield DataChunk(type="data-output", id=self.message_id, data=event["output"])
        elif name == "error":
            yield from self._text_end()
            self.finish_reason = "error"
            yield ErrorChunk(error_text=f"{event['error_type']}: {event['error']}")
        elif name == "done":
            yield from self._text_end()
            metadata = {"status": self.status} if self.status else None
            yield FinishChunk(finish_reason=self.finish_reason, message_metadata=metadata)
            yield DoneChunk()

    def _new_text(self, token: str) -> str:
        """The text a delta adds: the token itself for a text answer; for a structured one, what its spoken field
        gained since the last (the token is the whole partial output so far)."""
        if not self.structured:
            return token
        if self.spoken_field is None:
            return ""
        try:
            partial = json.loads(token)
        except ValueError:
            return ""
        spoken = partial.get(self.spoken_field) if isinstance(partial, dict) else None
        # A partial field only grows; one that changed otherwise cannot be taken back from the client's text.
        if not isinstance(spoken, str) or not spoken.startswith(self.spoken):
            return ""
        delta, self.spoken = spoken[len(self.spoken) :], spoken
        return delta

    def _text_end(self) -> Iterator[BaseChunk]:
        if self.text_id is not None:
            yield TextEndChunk(id=self.text_id)
            self.text_id = None

    def _call(self, tool: str, args: JSON) -> ToolInputAvailableChunk:
        self.calls += 1
        if self.decided is not None and self.decided.tool == tool:
            call_id, self.decided = self.decided.tool_call_id, None
        else:
            call_id = f"{self.message_id}-{self.call_prefix}call-{self.calls}"
        self.waiting.setdefault(tool, deque()).append(call_id)
        return ToolInputAvailableChunk(tool_call_id=call_id, tool_name=tool, input=args if args is not None else {})


def sse(chunk: BaseChunk) -> str:
    return f"data: {chunk.encode(SDK_VERSION)}\n\n"


async def ui_message_stream(batches: AsyncIterator[list[Event]], translator: ChunkTranslator) -> AsyncIterator[bytes]:
    """The run's events, batch by batch, as Server-Sent Events of AI SDK chunks, to the run's `done`."""
    async for batch in batches:
        if frames := [sse(chunk) for event in batch for chunk in translator.chunks(event)]:
            yield "".join(frames).encode()


async def no_events() -> AsyncIterator[list[Event]]:
    """A decision that leaves other approvals of the answer waiting: nothing goes on yet, and the stream ends."""
    yield [{"event": "done"}]
