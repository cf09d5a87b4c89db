import asyncio
import logging

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from bankagent.async_views import AsyncAPIView
from bankagent.db import db
from bankagent.exceptions import ApplicationError, BadHost, NotFound, ServiceUnavailable, error_response
from bankagent.schema import error_schema, errors
from runs.hub import hub

logger = logging.getLogger(__name__)

CHANNEL_LAYER_TIMEOUT = 2.0
HEALTH_FIELDS = ["status", "database", "channel_layer"]


def health_schema(*values: str) -> dict:
    properties = {name: {"type": "string", "enum": list(values)} for name in HEALTH_FIELDS}
    return {"type": "object", "required": HEALTH_FIELDS, "properties": properties}


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _database_ok() -> bool:
    try:
        await db(_select_one)()
        return True
    except Exception:
        logger.exception("Health check: database unreachable")
        return False


async def _channel_layer_ok() -> bool:
    try:
        await hub().ping(CHANNEL_LAYER_TIMEOUT)
        return True
    except Exception:
        logger.exception("Health check: channel layer unreachable")
        return False


class HealthView(AsyncAPIView):
    """Whether this process can serve: its database and its channel layer answer. No key needed."""

    authentication_classes: list = []
    permission_classes: list = []
    throttle_classes: list = []

    @extend_schema(
        operation_id="health",
        responses={
            200: OpenApiResponse(health_schema("ok")),
            503: OpenApiResponse(
                {"allOf": [health_schema("ok", "error"), error_schema([ServiceUnavailable.default_code])]},
                description="`status` is `error`, and so is each dependency that did not answer; the error object "
                "is `service_unavailable`.",
            ),
            **errors(BadHost),
        },
    )
    async def get(self, request: Request) -> Response:
        # Together: a dependency that hangs until its timeout does not add to the other's.
        database, channel_layer = await asyncio.gather(_database_ok(), _channel_layer_ok())
        checks = {"database": database, "channel_layer": channel_layer}
        body = {"status": "ok" if all(checks.values()) else "error"}
        body |= {name: "ok" if ok else "error" for name, ok in checks.items()}
        if all(checks.values()):
            return Response(body)
        error = ServiceUnavailable()
        return Response(body | error.as_dict(), status=503, headers={"Retry-After": str(error.retry_after)})


@csrf_exempt
def api_not_found(request: HttpRequest, *args: object, **kwargs: object) -> JsonResponse:
    return error_response(NotFound("There is no endpoint at this path."))


def server_error(request: HttpRequest) -> JsonResponse:
    """What failed outside DRF's handler (middleware, rendering): the contract's 500, never Django's page."""
    return error_response(ApplicationError())
