"""The REST endpoints: threads and their messages, the agents, and the runs that answer on a thread."""

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from agents.registry import AGENTS, AgentSpec, agent_types
from bankagent import context
from bankagent.async_views import AsyncAPIView
from bankagent.db import db
from bankagent.exceptions import (
    ApprovalDecided,
    ApprovalExpired,
    InvalidCursor,
    InvalidLimit,
    InvalidResume,
    InvalidText,
    NotFound,
    ResumeExpired,
    ServiceUnavailable,
    UnknownAgentType,
)
from bankagent.jsontypes import JSONObject
from bankagent.pagination import MAX_LIMIT, KeysetPaginator
from bankagent.schema import (
    AG_UI_EVENT_REF,
    AG_UI_EXAMPLES,
    AG_UI_REQUEST_REF,
    AGENT_QUERY_EXAMPLES,
    AGENT_STREAM_EXAMPLES,
    BODY_ERRORS,
    CALL_ERRORS,
    DECISION_ERRORS,
    RUN_ERRORS,
    RUN_START_ERRORS,
    SESSION_WRITE_ERRORS,
    STREAM_EVENT_EXAMPLES,
    STREAM_EVENT_REF,
    THREAD_CREATE_EXAMPLES,
    UI_STREAM_EVENT_REF,
    UI_STREAM_EXAMPLES,
    UI_STREAM_REQUEST_REF,
    errors,
)
from bankagent.throttling import RUN_THROTTLES
from identity.tickets import ticket_issue
from runs.eventlog import last_seq
from runs.events import Backlog, Dialect, Event, encode
from runs.lease import Turn
from runs.pipeline import start_decision, start_stream
from runs.resume import follow, resume_point
from runs.runner import decide_blocking, run_blocking
from runs.services import runs_interrupt
from threads import ag_ui, selectors, services
from threads.ag_ui import InvalidAGUIRequest
from threads.models import Message, Thread
from threads.serializers import (
    AgentQuerySerializer,
    AgentResponseSerializer,
    AgentSerializer,
    ApprovalDecisionSerializer,
    MessageSerializer,
    ThreadCreateSerializer,
    ThreadDetailSerializer,
    ThreadSerializer,
    ThreadUpdateSerializer,
    TicketRequestSerializer,
    TicketSerializer,
)
from threads.ui_stream import (
    HEADERS,
    SPOKEN_FIELDS,
    ChunkTranslator,
    InvalidUIRequest,
    UIDecision,
    new_turn,
    no_events,
    ui_message_stream,
)

THREAD_PAGES = KeysetPaginator(fields=["updated_at", "id"], salt="threads")
MESSAGE_PAGES = KeysetPaginator(fields=["seq"], salt="messages", default_limit=50)


def page_parameters(default_limit: int) -> list[OpenApiParameter]:
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": default_limit}
    cursor = {"type": "string", "minLength": 1}
    return [
        OpenApiParameter("limit", limit, description=f"Items per page, 1 to {MAX_LIMIT}; else 400 `invalid_limit`."),
        OpenApiParameter(
            "cursor",
            cursor,
            description="Opaque: the `cursor` of the `Link` header's URL. One the server did not issue answers 400 "
            "`invalid_cursor`.",
        ),
        OpenApiParameter(
            "Link",
            str,
            OpenApiParameter.HEADER,
            response=[200],
            description='The next page, as `<URL>; rel="next"` (RFC 8288); absent on the last page.',
        ),
    ]


THREAD_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="A thread of the end user.")
AGENT_TYPE_FILTER = OpenApiParameter(
    "agent_type",
    {"type": "string", "enum": ["", *agent_types()]},
    description="Only threads of this agent; empty: no filter. Another value answers 422 `unknown_agent_type`.",
)


def validated(serializer_class: type[Serializer], data: object, **context: object) -> JSONObject:
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def repaired(thread: Thread, read: Callable[[], list[Message]]) -> list[Message]:
    """Messages as `read` gives them, with an answer whose run died marked interrupted first, and each answer that
    waits for the customer's approval with what it waits for."""
    messages = read()
    if any(message.run_lapsed for message in messages):
        runs_interrupt(thread_id=thread.pk)
        messages = read()
    return selectors.with_pending_approvals(messages)


def active_run(messages: list[Message]) -> dict[str, object] | None:
    """The run answering on the thread, if any: always its latest message."""
    if not messages or messages[-1].status != Message.Status.IN_PROGRESS:
        return None
    answer = messages[-1]
    return {"message_id": answer.pk, "last_seq": last_seq(str(answer.pk)) or 0}


def own_thread(request: Request, thread_id: uuid.UUID) -> Thread:
    """The caller's end user's thread; anyone else's is a 404."""
    context.bind(user_id=request.user.user_id, thread_id=thread_id)
    return selectors.thread_get_for_user(thread_id=thread_id, user_id=request.user.user_id)


class ThreadViewSet(viewsets.ViewSet):
    lookup_value_regex = "[^/]+"

    def _thread(self, request: Request, pk: str) -> Thread:
        return own_thread(request, selectors.parse_thread_id(pk))

    @extend_schema(
        operation_id="threads_list",
        parameters=[*page_parameters(THREAD_PAGES.default_limit), AGENT_TYPE_FILTER],
        responses={
            200: ThreadSerializer(many=True),
            **errors(*CALL_ERRORS, InvalidLimit, InvalidCursor, UnknownAgentType),
        },
    )
    def list(self, request: Request) -> Response:
        """The end user's threads, most recently updated first."""
        agent_type = request.query_params.get("agent_type") or None
        if agent_type is not None and agent_type not in AGENTS:
            raise UnknownAgentType.of(agent_type, agent_types())
        threads = selectors.thread_list(user_id=request.user.user_id, agent_type=agent_type)
        page, headers = THREAD_PAGES.page(request, threads)
        return Response(ThreadSerializer(page, many=True).data, headers=headers)

    @extend_schema(
        operation_id="threads_create",
        request=ThreadCreateSerializer,
        responses={
            201: ThreadSerializer,
            **errors(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, InvalidText, UnknownAgentType),
        },
        examples=THREAD_CREATE_EXAMPLES,
    )
    def create(self, request: Request) -> Response:
        """A new thread of the end user with an agent of the registry."""
        data = validated(ThreadCreateSerializer, request.data, agent_types=agent_types())
        thread = services.thread_create(user_id=request.user.user_id, **data)
        return Response(ThreadSerializer(thread).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="threads_retrieve",
        parameters=[THREAD_ID],
        responses={200: ThreadDetailSerializer, **errors(*CALL_ERRORS, NotFound)},
    )
    def retrieve(self, request: Request, pk: str) -> Response:
        """The thread with its latest 50 messages, in chronological order."""
        thread = self._thread(request, pk)
        latest: dict[str, bool] = {}

        def read() -> list[Message]:
            messages, latest["more"] = selectors.thread_latest_messages(thread=thread)
            return messages

        thread.messages_page = repaired(thread, read)
        thread.has_more_messages = latest["more"]
        thread.active_run = active_run(thread.messages_page)
        return Response(ThreadDetailSerializer(thread).data)

    @extend_schema(
        operation_id="threads_update",
        parameters=[THREAD_ID],
        request=ThreadUpdateSerializer,
        responses={
            200: ThreadSerializer,
            **errors(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, InvalidText, NotFound),
        },
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        """Change the title or the metadata; other fields of the body are ignored."""
        thread = self._thread(request, pk)
        data = validated(ThreadUpdateSerializer, request.data)
        return Response(ThreadSerializer(services.thread_update(thread=thread, **data)).data)

    @extend_schema(
        operation_id="threads_delete",
        parameters=[THREAD_ID],
        responses={204: None, **errors(*CALL_ERRORS, *SESSION_WRITE_ERRORS, NotFound)},
    )
    def destroy(self, request: Request, pk: str) -> Response:
        """Delete the thread and its messages."""
        services.thread_delete(thread=self._thread(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        operation_id="threads_messages",
        parameters=[THREAD_ID, *page_parameters(MESSAGE_PAGES.default_limit)],
        responses={
            200: MessageSerializer(many=True),
            **errors(*CALL_ERRORS, NotFound, InvalidLimit, InvalidCursor),
        },
    )
    @action(detail=True, methods=["get"])
    def messages(self, request: Request, pk: str) -> Response:
        """The thread's messages in chronological order, latest page first; the `Link` header's next page is the
        older one."""
        thread = self._thread(request, pk)
        headers: dict[str, str] = {}

        def read() -> list[Message]:
            page, found = MESSAGE_PAGES.page(request, selectors.message_list(thread=thread))
            headers.update(found)
            return page

        page = repaired(thread, read)
        return Response(MessageSerializer(page[::-1], many=True).data, headers=headers)


class AgentViewSet(viewsets.ViewSet):
    @extend_schema(operation_id="agents_list", responses={200: AgentSerializer(many=True), **errors(*CALL_ERRORS)})
    def list(self, request: Request) -> Response:
        """The agents a thread can be created with."""
        return Response(AgentSerializer(AGENTS.values(), many=True).data)

    @extend_schema(
        operation_id="ws_ticket_create",
        request=TicketRequestSerializer,
        responses={201: TicketSerializer, **errors(*CALL_ERRORS, *BODY_ERRORS, NotFound, ServiceUnavailable)},
    )
    @action(detail=False, methods=["post"])
    def ticket(self, request: Request) -> Response:
        """A single-use ticket, valid for 60 seconds, that opens the thread's websocket as this key and end user
        (`/ws/v1/threads/{id}/?ticket=...`), for browsers, which cannot set headers. API keys only."""
        data = validated(TicketRequestSerializer, request.data)
        thread = own_thread(request, data["thread_id"])
        ticket, expires_at = ticket_issue(
            api_key_id=request.user.api_key_id, user_id=thread.user_id, thread_id=thread.pk
        )
        return Response(TicketSerializer({"ticket": ticket, "expires_at": expires_at}).data, status=201)


class AgentQueryView(AsyncAPIView):
    """A blocking query: the answer once it is saved."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(
        operation_id="agent_query",
        request=AgentQuerySerializer,
        responses={
            200: AgentResponseSerializer,
            **errors(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, *RUN_ERRORS),
        },
        examples=AGENT_QUERY_EXAMPLES,
    )
    async def post(self, request: Request) -> Response:
        data = validated(AgentQuerySerializer, request.data)
        context.bind(user_id=request.user.user_id, thread_id=data["thread_id"])
        turn = await run_blocking(user_id=request.user.user_id, thread_id=data["thread_id"], query=data["query"])
        return await answered(turn)


async def answered(turn: Turn) -> Response:
    """A blocking run's exchange as the client gets it, with what an answer waiting for approval waits for."""
    if turn.assistant_message.status == Message.Status.AWAITING_APPROVAL:
        await db(selectors.with_pending_approvals)([turn.assistant_message])
    return Response(AgentResponseSerializer(turn).data)


class ApprovalDecisionView(AsyncAPIView):
    """The customer's decision on a tool call an answer waits for: the answer goes on, and is returned."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(
        operation_id="approval_decide",
        parameters=[
            THREAD_ID,
            OpenApiParameter(
                "approval_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The approval to decide."
            ),
        ],
        request=ApprovalDecisionSerializer,
        responses={
            200: AgentResponseSerializer,
            **errors(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, *DECISION_ERRORS),
        },
    )
    async def post(self, request: Request, pk: str, approval_id: str) -> Response:
        thread_id = selectors.parse_thread_id(pk)
        try:
            approval = uuid.UUID(approval_id)
        except ValueError as exc:
            raise NotFound("There is no such approval on this thread.") from exc
        data = validated(ApprovalDecisionSerializer, request.data)
        context.bind(user_id=request.user.user_id, thread_id=thread_id)
        turn = await decide_blocking(
            user_id=request.user.user_id,
            thread_id=thread_id,
            approval_id=approval,
            approved=data["approved"],
            note=data["note"],
        )
        return await answered(turn)


class AgentStreamView(AsyncAPIView):
    """A streamed query: NDJSON events as the answer is written; the run goes on if the client goes away."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(
        operation_id="agent_stream",
        request=AgentQuerySerializer,
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(
                STREAM_EVENT_REF,
                description="One JSON object a line (`schema` describes one line), flushed as the answer is "
                "written; a failure after the first line is an `error` event, then `done`.",
                examples=STREAM_EVENT_EXAMPLES,
            ),
            **errors(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, *RUN_START_ERRORS),
        },
        examples=AGENT_STREAM_EXAMPLES,
    )
    async def post(self, request: Request) -> StreamingHttpResponse:
        data = validated(AgentQuerySerializer, request.data)
        context.bind(user_id=request.user.user_id, thread_id=data["thread_id"])
        listener = await start_stream(
            user_id=request.user.user_id, thread_id=data["thread_id"], query=data["query"], listen=True
        )
        assert listener is not None
        return ndjson_response(batches_ndjson(listener.batches(), Dialect(request.user.events)))


class UIStreamView(AsyncAPIView):
    """A streamed query in the AI SDK's UI message stream protocol (`useChat`), on the thread's own history."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(
        operation_id="thread_ui_stream",
        parameters=[THREAD_ID],
        request={"application/json": UI_STREAM_REQUEST_REF},
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                UI_STREAM_EVENT_REF,
                description="Server-Sent Events, `data: <UIMessageChunk JSON>` each (`schema` describes one "
                "event), with `x-vercel-ai-ui-message-stream: v1`, ending with `data: [DONE]`; a failure after the "
                "first chunk is an `error` chunk, then `finish`.",
            ),
            **errors(
                *(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, *RUN_START_ERRORS, InvalidUIRequest),
                *(ApprovalDecided, ApprovalExpired),
            ),
        },
        examples=UI_STREAM_EXAMPLES,
    )
    async def post(self, request: Request, pk: str) -> StreamingHttpResponse:
        run = await start_thread_stream(request, pk, new_turn)
        spoken_field = SPOKEN_FIELDS.get(run.spec.agent_type)
        translator = ChunkTranslator(spoken_field=spoken_field, structured=run.spec.structured, decided=run.decided)
        return event_stream_response(ui_message_stream(run.batches, translator), HEADERS)


class AGUIView(AsyncAPIView):
    """A streamed query in the AG-UI protocol (`RunAgentInput` in, AG-UI events out), on the thread's own history."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(
        operation_id="thread_ag_ui",
        parameters=[THREAD_ID],
        request={"application/json": AG_UI_REQUEST_REF},
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                AG_UI_EVENT_REF,
                description="Server-Sent Events, `data: <AG-UI event JSON>` each (`schema` describes one event), "
                "from `RUN_STARTED` to `RUN_FINISHED` (its `outcome` an `interrupt` when the answer waits for "
                "approval); a failure after the first event is `RUN_ERROR`, the last one.",
            ),
            **errors(
                *(*CALL_ERRORS, *BODY_ERRORS, *SESSION_WRITE_ERRORS, *RUN_START_ERRORS, InvalidAGUIRequest),
                *(ApprovalDecided, ApprovalExpired),
            ),
        },
        examples=AG_UI_EXAMPLES,
    )
    async def post(self, request: Request, pk: str) -> StreamingHttpResponse:
        run = await start_thread_stream(request, pk, ag_ui.new_turn)
        translator = ag_ui.EventTranslator(
            thread_id=str(run.thread_id),
            spoken_field=SPOKEN_FIELDS.get(run.spec.agent_type),
            structured=run.spec.structured,
            decided=run.decided,
        )
        return event_stream_response(ag_ui.ag_ui_stream(run.batches, translator), ag_ui.HEADERS)


@dataclass(frozen=True)
class ThreadStream:
    thread_id: uuid.UUID
    spec: AgentSpec
    batches: AsyncIterator[list[Event]]
    decided: UIDecision | None = None
    """The decision on an approval the request carried, whose answer goes on in this stream."""


async def start_thread_stream(
    request: Request, pk: str, read_turn: Callable[[object], str | UIDecision]
) -> ThreadStream:
    """A run on the thread of the URL for a protocol's request, of which `read_turn` takes the new question (or a
    decision on an approval): every refusal is raised here, before the response starts."""
    thread_id = selectors.parse_thread_id(pk)
    turn = read_turn(request.data)
    if not isinstance(turn, UIDecision):
        turn = validated(AgentQuerySerializer, {"thread_id": str(thread_id), "query": turn})["query"]
    context.bind(user_id=request.user.user_id, thread_id=thread_id)
    thread = await db(selectors.thread_get_for_user)(thread_id=thread_id, user_id=request.user.user_id)
    spec = AGENTS[thread.agent_type]
    if not isinstance(turn, UIDecision):
        listener = await start_stream(user_id=request.user.user_id, thread_id=thread_id, query=turn, listen=True)
        assert listener is not None
        return ThreadStream(thread_id=thread_id, spec=spec, batches=listener.batches())
    listener = await start_decision(
        user_id=request.user.user_id,
        thread_id=thread_id,
        approval_id=turn.approval_id,
        approved=turn.approved,
        note=turn.reason,
        listen=True,
    )
    batches = listener.batches() if listener is not None else no_events()
    return ThreadStream(thread_id=thread_id, spec=spec, batches=batches, decided=turn)


def event_stream_response(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    for name, value in headers.items():
        response[name] = value
    return response


class RunEventsView(AsyncAPIView):
    """A run's events after a given one, then its live ones to its end: a stream resumed."""

    @extend_schema(
        operation_id="run_events",
        parameters=[
            THREAD_ID,
            OpenApiParameter(
                "message_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The answer the run writes."
            ),
            OpenApiParameter(
                "after",
                {"type": "integer", "minimum": 0, "default": 0},
                description="The `seq` of the last event received; else 400 `invalid_resume`.",
            ),
        ],
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(
                STREAM_EVENT_REF,
                description="The run's events with `seq` above `after`, in order, then its live ones, to its "
                "`done`; nothing when the run had ended and `after` was its last event.",
                examples=STREAM_EVENT_EXAMPLES,
            ),
            **errors(*CALL_ERRORS, NotFound, InvalidResume, ResumeExpired, ServiceUnavailable),
        },
    )
    async def get(self, request: Request, pk: str, message_id: str) -> StreamingHttpResponse:
        thread_id = selectors.parse_thread_id(pk)
        answer_id, after = resume_point(message_id, request.query_params.get("after", "0"))
        context.bind(user_id=request.user.user_id, thread_id=thread_id, run_id=answer_id)
        follower = await follow(
            thread_id=thread_id,
            user_id=request.user.user_id,
            message_id=answer_id,
            after=after,
            # Not merged: the follower does not know whether the run's deltas are cumulative.
            backlog=Backlog(cumulative=False, max_events=settings.STREAM_BACKLOG_EVENTS, merge_text=False),
        )
        return ndjson_response(batches_ndjson(follower.events(), Dialect(request.user.events)))


def ndjson_response(lines: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def batches_ndjson(batches: AsyncIterator[list[Event]], dialect: Dialect) -> AsyncIterator[bytes]:
    async for batch in batches:
        if lines := [line for event in batch if (line := encode(event, dialect)) is not None]:
            yield ("\n".join(lines) + "\n").encode()
