import asyncio
import logging
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response

from bankagent.exceptions import NotFound, ServiceUnavailable, error_response

logger = logging.getLogger(__name__)


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        logger.exception("Health check: database unreachable")
        return False


async def _channel_layer_roundtrip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "health.ping", "token": token})
    message = await asyncio.wait_for(layer.receive(channel), timeout=2)
    if message.get("token") != token:
        raise RuntimeError("channel layer returned another message")


def _channel_layer_ok() -> bool:
    try:
        async_to_sync(_channel_layer_roundtrip)()
        return True
    except Exception:
        logger.exception("Health check: channel layer unreachable")
        return False


@extend_schema(
    responses=inline_serializer(
        "Health",
        {
            "status": serializers.CharField(),
            "database": serializers.CharField(),
            "channel_layer": serializers.CharField(),
        },
    )
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([])
def health(request: Request) -> Response:
    checks = {"database": _database_ok(), "channel_layer": _channel_layer_ok()}
    body = {"status": "ok" if all(checks.values()) else "error"}
    body |= {name: "ok" if ok else "error" for name, ok in checks.items()}
    if all(checks.values()):
        return Response(body)
    return Response(body | ServiceUnavailable().as_dict(), status=503)


@csrf_exempt
def api_not_found(request: HttpRequest, *args: object, **kwargs: object) -> JsonResponse:
    return error_response(NotFound("There is no endpoint at this path."))
