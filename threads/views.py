import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from agents.fanout import start_stream
from agents.registry import AGENTS, agent_types
from agents.runner import run_query
from bankagent.exceptions import UnknownAgentType
from bankagent.pagination import KeysetPaginator
from identity.tickets import ticket_issue
from threads import selectors, services
from threads.models import Thread
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


def validated(serializer_class: type, data: Any, **context: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


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
        thread.messages_page, thread.has_more_messages = selectors.thread_latest_messages(thread=thread)
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
        page, headers = MESSAGE_PAGES.page(request, selectors.message_list(thread=thread))
        return Response(MessageSerializer(page[::-1], many=True).data, headers=headers)


class AgentViewSet(viewsets.ViewSet):
    @extend_schema(responses=AgentSerializer(many=True))
    def list(self, request: Request) -> Response:
        return Response(AgentSerializer(AGENTS.values(), many=True).data)

    @extend_schema(request=AgentQuerySerializer, responses=AgentResponseSerializer)
    @action(detail=False, methods=["post"])
    def query(self, request: Request) -> Response:
        data = validated(AgentQuerySerializer, request.data)
        thread = own_thread(request, data["thread_id"])
        turn = async_to_sync(run_query)(thread=thread, query=data["query"])
        return Response(AgentResponseSerializer(turn).data)

    @extend_schema(request=AgentQuerySerializer, responses={(200, "application/x-ndjson"): str})
    @action(detail=False, methods=["post"])
    def stream(self, request: Request) -> StreamingHttpResponse:
        data = validated(AgentQuerySerializer, request.data)
        thread = own_thread(request, data["thread_id"])
        # Under ASGI this runs in the server's event loop, so the run outlives this request if the client goes.
        handle = async_to_sync(start_stream)(thread=thread, query=data["query"], listen=True)
        response = StreamingHttpResponse(ndjson(handle.events()), content_type="application/x-ndjson")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    @extend_schema(request=TicketRequestSerializer, responses={201: TicketSerializer})
    @action(detail=False, methods=["post"])
    def ticket(self, request: Request) -> Response:
        data = validated(TicketRequestSerializer, request.data)
        thread = own_thread(request, data["thread_id"])
        ticket, expires_at = ticket_issue(
            api_key_id=request.user.api_key_id, user_id=thread.user_id, thread_id=thread.pk
        )
        return Response(TicketSerializer({"ticket": ticket, "expires_at": expires_at}).data, status=201)


async def ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield json.dumps(event, ensure_ascii=False).encode() + b"\n"
