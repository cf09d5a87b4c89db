"""The REST endpoints: threads and their messages, the agents, and the runs that answer on a thread."""

import uuid
from collections.abc import AsyncIterator, Callable

from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from agents.registry import AGENTS, agent_types
from bankagent.async_views import AsyncAPIView
from bankagent.exceptions import UnknownAgentType
from bankagent.jsontypes import JSONObject
from bankagent.pagination import KeysetPaginator
from bankagent.throttling import RUN_THROTTLES
from identity.tickets import ticket_issue
from runs.events import Backlog, BacklogFull, Dialect, encode
from runs.pipeline import start_stream
from runs.runner import run_blocking
from runs.services import runs_interrupt
from threads import selectors, services
from threads.models import Message, Thread
from threads.serializers import (
    AgentQuerySerializer,
    AgentResponseSerializer,
    AgentSerializer,
    MessageSerializer,
    ThreadCreateSerializer,
    ThreadDetailSerializer,
    ThreadSerializer,
    ThreadUpdateSerializer,
    TicketRequestSerializer,
    TicketSerializer,
)

THREAD_PAGES = KeysetPaginator(fields=["updated_at", "id"], salt="threads")
MESSAGE_PAGES = KeysetPaginator(fields=["seq"], salt="messages", default_limit=50)
PAGE_PARAMETERS = [
    OpenApiParameter("limit", int, description="1 to 100."),
    OpenApiParameter("cursor", str, description="From the `Link` header of the previous page."),
]


def validated(serializer_class: type[Serializer], data: object, **context: object) -> JSONObject:
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def repaired(thread: Thread, read: Callable[[], list[Message]]) -> list[Message]:
    """Messages as `read` gives them, with an answer whose run died marked interrupted first."""
    messages = read()
    if any(message.run_lapsed for message in messages):
        runs_interrupt(thread_id=thread.pk)
        messages = read()
    return messages


def own_thread(request: Request, thread_id: uuid.UUID) -> Thread:
    """The caller's end user's thread; anyone else's is a 404."""
    return selectors.thread_get_for_user(thread_id=thread_id, user_id=request.user.user_id)


class ThreadViewSet(viewsets.ViewSet):
    lookup_value_regex = "[^/]+"

    def _thread(self, request: Request, pk: str) -> Thread:
        return own_thread(request, selectors.parse_thread_id(pk))

    @extend_schema(
        parameters=[*PAGE_PARAMETERS, OpenApiParameter("agent_type", str)], responses=ThreadSerializer(many=True)
    )
    def list(self, request: Request) -> Response:
        agent_type = request.query_params.get("agent_type")
        if agent_type is not None and agent_type not in AGENTS:
            raise UnknownAgentType.of(agent_type, agent_types())
        threads = selectors.thread_list(user_id=request.user.user_id, agent_type=agent_type)
        page, headers = THREAD_PAGES.page(request, threads)
        return Response(ThreadSerializer(page, many=True).data, headers=headers)

    @extend_schema(request=ThreadCreateSerializer, responses={201: ThreadSerializer})
    def create(self, request: Request) -> Response:
        data = validated(ThreadCreateSerializer, request.data, agent_types=agent_types())
        thread = services.thread_create(user_id=request.user.user_id, **data)
        return Response(ThreadSerializer(thread).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses=ThreadDetailSerializer)
    def retrieve(self, request: Request, pk: str) -> Response:
        thread = self._thread(request, pk)
        latest: dict[str, bool] = {}

        def read() -> list[Message]:
            messages, latest["more"] = selectors.thread_latest_messages(thread=thread)
            return messages

        thread.messages_page = repaired(thread, read)
        thread.has_more_messages = latest["more"]
        return Response(ThreadDetailSerializer(thread).data)

    @extend_schema(request=ThreadUpdateSerializer, responses=ThreadSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        thread = self._thread(request, pk)
        data = validated(ThreadUpdateSerializer, request.data)
        return Response(ThreadSerializer(services.thread_update(thread=thread, **data)).data)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.thread_delete(thread=self._thread(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(parameters=PAGE_PARAMETERS, responses=MessageSerializer(many=True))
    @action(detail=True, methods=["get"])
    def messages(self, request: Request, pk: str) -> Response:
        thread = self._thread(request, pk)
        headers: dict[str, str] = {}

        def read() -> list[Message]:
            page, found = MESSAGE_PAGES.page(request, selectors.message_list(thread=thread))
            headers.update(found)
            return page

        page = repaired(thread, read)
        return Response(MessageSerializer(page[::-1], many=True).data, headers=headers)


class AgentViewSet(viewsets.ViewSet):
    @extend_schema(responses=AgentSerializer(many=True))
    def list(self, request: Request) -> Response:
        return Response(AgentSerializer(AGENTS.values(), many=True).data)

    @extend_schema(request=TicketRequestSerializer, responses={201: TicketSerializer})
    @action(detail=False, methods=["post"])
    def ticket(self, request: Request) -> Response:
        data = validated(TicketRequestSerializer, request.data)
        thread = own_thread(request, data["thread_id"])
        ticket, expires_at = ticket_issue(
            api_key_id=request.user.api_key_id, user_id=thread.user_id, thread_id=thread.pk
        )
        return Response(TicketSerializer({"ticket": ticket, "expires_at": expires_at}).data, status=201)


class AgentQueryView(AsyncAPIView):
    """A blocking query: the answer once it is saved."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(request=AgentQuerySerializer, responses=AgentResponseSerializer)
    async def post(self, request: Request) -> Response:
        data = validated(AgentQuerySerializer, request.data)
        turn = await run_blocking(user_id=request.user.user_id, thread_id=data["thread_id"], query=data["query"])
        return Response(AgentResponseSerializer(turn).data)


class AgentStreamView(AsyncAPIView):
    """A streamed query: NDJSON events as the answer is written; the run goes on if the client goes away."""

    throttle_classes = RUN_THROTTLES

    @extend_schema(request=AgentQuerySerializer, responses={(200, "application/x-ndjson"): str})
    async def post(self, request: Request) -> StreamingHttpResponse:
        data = validated(AgentQuerySerializer, request.data)
        listener = await start_stream(
            user_id=request.user.user_id, thread_id=data["thread_id"], query=data["query"], listen=True
        )
        assert listener is not None
        events = ndjson(listener, Dialect(request.user.events))
        response = StreamingHttpResponse(events, content_type="application/x-ndjson")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response


async def ndjson(listener: Backlog, dialect: Dialect) -> AsyncIterator[bytes]:
    """The run's events, one JSON object a line; a client too far behind is cut off (the run goes on)."""
    while True:
        try:
            batch = await listener.take()
        except BacklogFull:
            return
        lines = [line for event in batch if (line := encode(event, dialect)) is not None]
        if lines:
            yield ("\n".join(lines) + "\n").encode()
        if batch[-1]["event"] == "done":
            return
