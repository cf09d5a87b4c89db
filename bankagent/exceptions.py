"""The application's errors, and the one handler that renders every error in the contract's shape.

Each error is a DRF `APIException` with its HTTP status, its machine `code` and its message; DRF's own
exceptions (not authenticated, method not allowed, throttled, ...) render the same way under their own codes.
"""

import logging
import math
import uuid
from collections.abc import Mapping
from datetime import datetime

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import OperationalError
from django.http import Http404, JsonResponse
from redis.exceptions import RedisError
from rest_framework import exceptions as drf
from rest_framework.response import Response

from bankagent.jsontypes import JSON, JSONObject

logger = logging.getLogger(__name__)


class ApplicationError(drf.APIException):
    status_code = 500
    default_code = "internal_error"
    default_detail = "Something went wrong on our side."
    retry_after: int | None = None
    """Seconds a client should wait before trying again, sent as `Retry-After`."""

    def __init__(self, message: str | None = None, *, details: Mapping[str, JSON] | None = None) -> None:
        # A default message may name a limit from the settings, where every limit is defined.
        super().__init__(message or self.default_detail.format(settings=settings), self.default_code)
        self.details = dict(details) if details else None

    @property
    def code(self) -> str:
        return self.default_code

    @property
    def message(self) -> str:
        return str(self.detail)

    @property
    def status(self) -> int:
        return self.status_code

    def as_dict(self) -> JSONObject:
        error: JSONObject = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class InvalidUserId(ApplicationError):
    status_code, default_code = 400, "invalid_user_id"
    default_detail = "X-User-ID must be a UUID naming the end user."


class MalformedJson(ApplicationError):
    status_code, default_code = 400, "malformed_json"
    default_detail = "The request body is not valid JSON."


class NotAnObject(ApplicationError):
    status_code, default_code = 400, "invalid_body"
    default_detail = "The request body must be a JSON object."


class InvalidText(ApplicationError):
    status_code, default_code = 400, "invalid_text"
    default_detail = "Text must not contain NUL characters or unpaired surrogates."


class InvalidLimit(ApplicationError):
    status_code, default_code = 400, "invalid_limit"
    default_detail = "limit must be an integer from 1 to 100."


class InvalidCursor(ApplicationError):
    status_code, default_code = 400, "invalid_cursor"
    default_detail = "The cursor is not one this server issued."


class BadHost(ApplicationError):
    status_code, default_code = 400, "bad_host"
    default_detail = "The Host header names a host this server does not serve."


class BadFrame(ApplicationError):
    status_code, default_code = 400, "bad_frame"
    default_detail = "Frames are JSON objects with a type: query, cancel or ping."


class NotAuthenticated(ApplicationError):
    status_code, default_code = 401, "not_authenticated"
    default_detail = "An X-API-Key header is required."


class AuthenticationFailed(ApplicationError):
    status_code, default_code = 401, "authentication_failed"
    default_detail = "The API key is invalid, revoked or expired."


class CsrfFailed(ApplicationError):
    status_code, default_code = 403, "csrf_failed"
    default_detail = "The CSRF token is missing or wrong: reload the page and try again."


class NotFound(ApplicationError):
    status_code, default_code = 404, "not_found"
    default_detail = "Not found."


class InvalidResume(ApplicationError):
    status_code, default_code = 400, "invalid_resume"
    default_detail = "after must be a whole number of at least 0: the seq of the last event received."


class ResumeExpired(ApplicationError):
    status_code, default_code = 410, "resume_expired"
    default_detail = "The events of this answer are no longer kept: read the thread again."


class ThreadBusy(ApplicationError):
    status_code, default_code = 409, "thread_busy"
    default_detail = "An answer is already being generated on this thread."


class ApprovalPending(ApplicationError):
    status_code, default_code = 409, "approval_pending"
    default_detail = "An answer on this thread waits for your approval: approve or deny it first."


class ApprovalLapsed(ThreadBusy):
    """A question on a thread whose answer waits for an approval that has expired: that answer is being finished
    (the model is told it expired) before the thread takes another question."""

    default_detail = "The answer before waits for an approval that has expired: it is being finished. Ask again."
    retry_after = 2

    def __init__(self, message_id: uuid.UUID) -> None:
        super().__init__()
        self.message_id = message_id


class ApprovalDecided(ApplicationError):
    status_code, default_code = 409, "approval_decided"
    default_detail = "This approval has been decided already."


class ApprovalExpired(ApplicationError):
    status_code, default_code = 410, "approval_expired"
    default_detail = "This approval expired before it was decided: nothing was done, and the answer goes on."


class PayloadTooLarge(ApplicationError):
    status_code, default_code = 413, "payload_too_large"
    default_detail = "The request body is larger than {settings.MAX_BODY_BYTES:,} bytes."


class UnsupportedMediaType(ApplicationError):
    status_code, default_code = 415, "unsupported_media_type"
    default_detail = "Send a JSON object (Content-Type: application/json)."


class ValidationFailed(ApplicationError):
    status_code, default_code = 422, "validation_error"
    default_detail = "The request did not pass validation."

    @classmethod
    def of(cls, exc: drf.ValidationError) -> "ValidationFailed":
        """The contract's shape of a serializer's errors: field name to messages."""
        return cls(details=exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail})


class QueryTooLong(ApplicationError):
    status_code, default_code = 422, "query_too_long"
    default_detail = "query must be at most {settings.MAX_QUERY_CHARS:,} characters."


class UnknownAgentType(ApplicationError):
    status_code, default_code = 422, "unknown_agent_type"
    default_detail = "agent_type does not name a known agent."

    @classmethod
    def of(cls, agent_type: str, known: list[str]) -> "UnknownAgentType":
        return cls(
            f"Unknown agent_type {agent_type!r}; known: {', '.join(known)}.", details={"known_agent_types": known}
        )


class UsageLimitReached(ApplicationError):
    """A run that needed more model requests, tool calls or output tokens than a run may use: asking again the same
    way would stop again."""

    status_code, default_code = 422, "usage_limit_reached"
    default_detail = (
        "The answer needed more than one answer may use (model requests, tool calls or output tokens): it was "
        "stopped, and what it wrote so far is kept."
    )


class Throttled(ApplicationError):
    status_code, default_code = 429, "throttled"
    default_detail = "Too many requests: slow down and try again."


class BudgetExceeded(ApplicationError):
    status_code, default_code = 429, "budget_exceeded"
    default_detail = "You have used today's tokens: ask again once they renew, at midnight UTC."

    def __init__(self, *, limit: int, used: int, renews_at: datetime, now: datetime) -> None:
        super().__init__(details={"limit": limit, "used": used, "renews_at": renews_at.isoformat()})
        self.retry_after = max(1, math.ceil((renews_at - now).total_seconds()))


class ModelError(ApplicationError):
    status_code, default_code = 502, "model_error"
    default_detail = "The language model failed to produce an answer."


class ServiceUnavailable(ApplicationError):
    status_code, default_code = 503, "service_unavailable"
    default_detail = "A service this server depends on is down."
    retry_after = 5


class ModelUnavailable(ApplicationError):
    status_code, default_code = 503, "model_unavailable"
    default_detail = "The language model is not available right now."


class ModelNotConfigured(ApplicationError):
    status_code, default_code = 503, "model_not_configured"
    default_detail = "The language model is not configured on this server."


class Overloaded(ApplicationError):
    status_code, default_code = 503, "overloaded"
    default_detail = "This server is answering as many questions as it can: try again shortly."
    retry_after = 1


class DatabaseBusy(ApplicationError):
    status_code, default_code = 503, "database_busy"
    default_detail = "The database is busy: try again shortly."
    retry_after = 1


class RunInterrupted(ApplicationError):
    status_code, default_code = 503, "run_interrupted"
    default_detail = "The answer was interrupted before it was saved: ask again."


class ModelTimeout(ApplicationError):
    status_code, default_code = 504, "model_timeout"
    default_detail = "The language model did not answer in time."


def database_busy(exc: BaseException) -> bool:
    """A database that stayed locked (SQLite) or out of connections (the pool) past its timeout."""
    if isinstance(exc, OperationalError) and "locked" in str(exc):
        return True
    # Django raises the pool's timeout as its own OperationalError, the pool's exception as its cause.
    return any(type(error).__name__ == "PoolTimeout" for error in (exc, exc.__cause__))


def as_application_error(exc: BaseException) -> drf.APIException:
    """The error a client is told about `exc`: an APIException as it is, anything else without its details."""
    if isinstance(exc, drf.ValidationError):
        return ValidationFailed.of(exc)
    if isinstance(exc, Http404 | PermissionDenied):
        return NotFound()
    if isinstance(exc, drf.APIException):
        return exc
    if database_busy(exc):
        logger.warning("Database busy: %s", exc)
        return DatabaseBusy()
    if isinstance(exc, RedisError):
        # The cache (tickets) is Redis when REDIS_URL is set; while it is down the client can only retry.
        logger.warning("Redis unavailable: %s", exc)
        return ServiceUnavailable()
    logger.error("Unhandled error", exc_info=exc)
    return ApplicationError()


def error_body(exc: drf.APIException) -> JSONObject:
    if isinstance(exc, ApplicationError):
        return exc.as_dict()
    code = exc.detail.code if isinstance(exc.detail, drf.ErrorDetail) else exc.default_code
    return {"error": {"code": code, "message": str(exc.detail)}}


def retry_after(exc: drf.APIException) -> int | None:
    if isinstance(exc, drf.Throttled) and exc.wait is not None:
        return max(1, exc.wait)  # DRF has rounded the wait up to whole seconds already
    return getattr(exc, "retry_after", None)


def exception_handler(exc: Exception, context: Mapping[str, object]) -> Response:
    """Render any exception raised in a DRF view as the contract's error object."""
    error = as_application_error(exc)
    response = Response(error_body(error), status=error.status_code)
    if error.status_code == 401:
        response["WWW-Authenticate"] = "X-API-Key"
    if (seconds := retry_after(error)) is not None:
        response["Retry-After"] = str(seconds)
    return response


def error_response(error: ApplicationError) -> JsonResponse:
    """The same error shape for code paths outside DRF (middleware, URL fallbacks)."""
    response = JsonResponse(error.as_dict(), status=error.status_code)
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    return response
