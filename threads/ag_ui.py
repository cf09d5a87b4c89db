"""The AG-UI protocol (Agent User Interaction) on the service's own threads.

The request is AG-UI's `RunAgentInput`, of which only the new question is taken: the thread's saved history is
what the model sees. The run is the service's own (`runs.pipeline.start_stream`), and its contract events are
translated here into AG-UI events, using the `ag-ui-protocol` package's models of both. The text and the tool call
ids are read from the run's events as for the AI SDK's stream (`threads.ui_stream`).
"""

import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator

from ag_ui.core import (
    BaseEvent,
    CustomEvent,
    Interrupt,
    ResumeEntry,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedInterruptOutcome,
    RunFinishedOutcome,
    RunFinishedSuccessOutcome,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TextPart,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    UserMessage,
)
from ag_ui.encoder import EventEncoder
from pydantic import ValidationError

from bankagent.exceptions import NotAnObject
from bankagent.jsontypes import JSON
from runs.events import Event
from threads.ui_stream import ChunkTranslator, UIDecision

PROTOCOL_VERSION = "1.0"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
APPROVAL_REASON = "tool_approval"
"""The `reason` of the interrupt an answer waiting for the customer's approval of a tool call ends with."""

ENCODER = EventEncoder()


class InvalidAGUIRequest(NotAnObject):
    default_detail = "The body must be AG-UI's RunAgentInput ending with exactly one new user message of text content."


def new_turn(body: object) -> str | UIDecision:
    """The text of the request's one new user message: the user messages after the last assistant message, which
    must be one, of text only; or, when the input resumes the interrupt an answer waiting for approval ended with,
    the customer's decision. Everything else the client sent (its history, system messages, tools, context, state)
    is ignored: the thread's saved history is what the model sees."""
    if not isinstance(body, dict):
        raise InvalidAGUIRequest()
    try:
        request = RunAgentInput.model_validate(body)
    except ValidationError as exc:
        fields = sorted({".".join(map(str, error["loc"])) for error in exc.errors(include_url=False)})[:10]
        raise InvalidAGUIRequest(details={"fields": fields}) from exc
    if request.resume:
        return _decision(request.resume)
    new: list[UserMessage] = []
    for message in reversed(request.messages):
        if message.role == "assistant":
            break
        if isinstance(message, UserMessage):
            new.append(message)
    if len(new) != 1:
        raise InvalidAGUIRequest(details={"new_user_messages": len(new)})
    content = new[0].content
    if isinstance(content, str):
        return content
    if not content or not all(isinstance(part, TextPart) for part in content):
        raise InvalidAGUIRequest("The new user message must be text, or text parts only.")
    return "\n".join(part.text for part in content if isinstance(part, TextPart))


def _decision(resume: list[ResumeEntry]) -> UIDecision:
    """`resolved` with `{"approved": true|false, "note"?}` as its payload decides; `cancelled` denies."""
    if len(resume) != 1:
        raise InvalidAGUIRequest("Resume one interrupt at a time.", details={"resume": len(resume)})
    (entry,) = resume
    payload = entry.payload if entry.status == "resolved" else {"approved": False}
    approved = payload.get("approved") if isinstance(payload, dict) else None
    note = payload.get("note", "") if isinstance(payload, dict) else ""
    if not isinstance(approved, bool) or not isinstance(note, str):
        raise InvalidAGUIRequest('A resolved interrupt\'s payload is {"approved": true|false, "note"?: "…"}.')
    try:
        approval_id = uuid.UUID(entry.interrupt_id)
    except ValueError as exc:
        raise InvalidAGUIRequest("The interrupt's id is not one this service gave.") from exc
    return UIDecision(approval_id=approval_id, approved=approved, reason=note, tool_call_id="", tool="")


class EventTranslator(ChunkTranslator):
    """One run's contract events as AG-UI events.

    The text and the call ids are the AI SDK stream's (a call's id is made here, and its result or approval goes
    to the earliest call of its tool still waiting for one); only what is sent differs. The answer's first text
    message has the answer's id, so that it is the message the thread's history then holds.
    """

    def __init__(
        self, *, thread_id: str, spoken_field: str | None, structured: bool, decided: UIDecision | None = None
    ) -> None:
        super().__init__(spoken_field=spoken_field, structured=structured, decided=decided)
        self.thread_id = thread_id
        self.interrupts: list[Interrupt] = []
        self.results = 0
        self.ended = False

    def events(self, event: Event) -> Iterator[BaseEvent]:
        if self.ended:
            return
        name = event["event"]
        if name == "message_started":
            self.message_id = str(event["message_id"])
            yield RunStartedEvent(thread_id=self.thread_id, run_id=self.message_id, protocol_version=PROTOCOL_VERSION)
        elif name == "text_delta":
            if delta := self._new_text(str(event["token"])):
                if self.text_id is None:
                    self.texts += 1
                    self.text_id = self.message_id if self.texts == 1 else f"{self.message_id}-text-{self.texts}"
                    yield TextMessageStartEvent(message_id=self.text_id, role="assistant")
                yield TextMessageContentEvent(message_id=self.text_id, delta=delta)
        elif name == "tool_call":
            yield from self._end_text()
            call = event["tool_call"]
            assert isinstance(call, dict)
            yield from self._start_call(str(call["name"]), call.get("args"))
        elif name == "tool_result":
            result = event["tool_result"]
            assert isinstance(result, dict)
            tool = str(result["name"])
            if not self.waiting.get(tool):
                yield from self._start_call(tool, None)
            self.results += 1
            yield ToolCallResultEvent(
                message_id=f"{self.message_id}-result-{self.results}",
                tool_call_id=self.waiting[tool].popleft(),
                content=json.dumps(result.get("content")),
                role="tool",
            )
        elif name == "approval_required":
            approval = event["approval"]
            assert isinstance(approval, dict)
            tool = str(approval["tool"])
            if not self.waiting.get(tool):
                yield from self._start_call(tool, approval.get("args"))
            expires_at = approval.get("expires_at")
            self.interrupts.append(
                Interrupt(
                    id=str(approval["id"]),
                    reason=APPROVAL_REASON,
                    message=f"May the assistant call {tool}?",
                    tool_call_id=self.waiting[tool].popleft(),
                    expires_at=str(expires_at) if expires_at is not None else None,
                    metadata={"approval": approval},
                )
            )
        elif name == "message_complete":
            yield from self._end_text()
            self.status = str(event["status"])
            if self.structured and event.get("output") is not None:
                yield CustomEvent(name="output", value=event["output"])
        elif name == "error":
            yield from self._end_text()
            self.ended = True
            yield RunErrorEvent(message=str(event["error"]), code=str(event["error_type"]))
        elif name == "done":
            yield from self._end_text()
            self.ended = True
            yield RunFinishedEvent(thread_id=self.thread_id, run_id=self.message_id, outcome=self._outcome())

    def _outcome(self) -> RunFinishedOutcome:
        if self.status == "awaiting_approval" and self.interrupts:
            return RunFinishedInterruptOutcome(interrupts=self.interrupts)
        if self.status == "incomplete":
            return RunFinishedCancelledOutcome()
        return RunFinishedSuccessOutcome()

    def _end_text(self) -> Iterator[BaseEvent]:
        if self.text_id is not None:
            yield TextMessageEndEvent(message_id=self.text_id)
            self.text_id = None

    def _start_call(self, tool: str, args: JSON) -> Iterator[BaseEvent]:
        self.calls += 1
        call_id = f"{self.message_id}-call-{self.calls}"
        self.waiting.setdefault(tool, deque()).append(call_id)
        yield ToolCallStartEvent(tool_call_id=call_id, tool_call_name=tool, parent_message_id=self.message_id)
        yield ToolCallArgsEvent(tool_call_id=call_id, delta=json.dumps(args if args is not None else {}))
        yield ToolCallEndEvent(tool_call_id=call_id)


async def ag_ui_stream(batches: AsyncIterator[list[Event]], translator: EventTranslator) -> AsyncIterator[bytes]:
    """The run's events, batch by batch, as Server-Sent Events of AG-UI events, to the run's end."""
    async for batch in batches:
        if frames := [ENCODER.encode(out) for event in batch for out in translator.events(event)]:
            yield "".join(frames).encode()
