"""The application's error family and the one handler that renders every error in the contract's shape."""

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    status: int = 500
    code: str = "internal_error"
    message: str = "Something went wrong on our side."

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None) -> None:
        self.message = message or self.message
        self.details = details
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def _error(status: int, code: str, message: str) -> type[ApplicationError]:
    return type(
        code.title().replace("_", ""), (ApplicationError,), {"status": status, "code": code, "message": message}
    )


InvalidUserId = _error(400, "invalid_user_id", "X-User-ID must be a UUID naming the end user.")
MalformedJson = _error(400, "malformed_json", "The request body is not valid JSON.")
NotAnObject = _error(400, "invalid_body", "The request body must be a JSON object.")
InvalidText = _error(400, "invalid_text", "Text must not contain NUL characters or unpaired surrogates.")
InvalidLimit = _error(400, "invalid_limit", "limit must be an integer from 1 to 100.")
InvalidCursor = _error(400, "invalid_cursor", "The cursor is not one this server issued.")
BadHost = _error(400, "bad_host", "The Host header names a host this server does not serve.")
NotAuthenticated = _error(401, "not_authenticated", "An X-API-Key header is required.")
AuthenticationFailed = _error(401, "authentication_failed", "The API key is invalid, revoked or expired.")
CsrfFailed = _error(403, "csrf_failed", "The CSRF token is missing or wrong: reload the page and try again.")
NotFound = _error(404, "not_found", "Not found.")
MethodNotAllowed = _error(405, "method_not_allowed", "This method is not allowed here.")
ThreadBusy = _error(409, "thread_busy", "An answer is already being generated on this thread.")
PayloadTooLarge = _error(413, "payload_too_large", "The request body is larger than 65,536 bytes.")
UnsupportedMediaType = _error(415, "unsupported_media_type", "Send a JSON object (Content-Type: application/json).")
ValidationFailed = _error(422, "validation_error", "The request did not pass validation.")
QueryTooLong = _error(422, "query_too_long", "query must be at most 8,000 characters.")
UnknownAgentType = _error(422, "unknown_agent_type", "agent_type does not name a known agent.")
Throttled = _error(429, "throttled", "Too many requests.")
ModelError = _error(502, "model_error", "The language model failed to produce an answer.")
ModelUnavailable = _error(503, "model_unavailable", "The language model is not available right now.")
ModelNotConfigured = _error(503, "model_not_configured", "The language model is not configured on this server.")
ModelTimeout = _error(504, "model_timeout", "The language model did not answer in time.")
BadFrame = _error(400, "bad_frame", "Frames are JSON objects with a type: query, cancel or ping.")
ServiceUnavailable = _error(503, "service_unavailable", "A service this server depends on is down.")


def unknown_agent_type(agent_type: str, known: list[str]) -> ApplicationError:
    return UnknownAgentType(
        f"Unknown agent_type {agent_type!r}; known: {', '.join(known)}.", details={"known_agent_types": known}
    )


def from_drf(exc: drf.APIException) -> ApplicationError:
    if isinstance(exc, drf.ValidationError):
        details = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return ValidationFailed(details=details)
    if isinstance(exc, drf.NotAuthenticated):
        return NotAuthenticated()
    if isinstance(exc, drf.AuthenticationFailed):
        return AuthenticationFailed()
    if isinstance(exc, drf.MethodNotAllowed):
        return MethodNotAllowed()
    if isinstance(exc, drf.NotFound):
        return NotFound()
    if isinstance(exc, drf.UnsupportedMediaType):
        return UnsupportedMediaType()
    if isinstance(exc, drf.ParseError):
        return MalformedJson()
    if isinstance(exc, drf.Throttled):
        return Throttled(details={"retry_after": exc.wait} if exc.wait else None)
    error = ApplicationError(str(exc.detail))
    error.status, error.code = exc.status_code, exc.default_code
    return error


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """Render any exception raised in a DRF view as the contract's error object."""
    if isinstance(exc, (Http404, PermissionDenied)):
        exc = NotFound()
    elif isinstance(exc, drf.APIException):
        exc = from_drf(exc)
    elif not isinstance(exc, ApplicationError):
        logger.exception("Unhandled error in %s", context.get("view").__class__.__name__)
        exc = ApplicationError()
    response = Response(exc.as_dict(), status=exc.status)
    if exc.status == 401:
        response["WWW-Authenticate"] = "X-API-Key"
    if exc.status == 429 and exc.details:
        response["Retry-After"] = str(int(exc.details["retry_after"]) + 1)
    return response


def error_response(error: ApplicationError) -> JsonResponse:
    """The same error shape for code paths outside DRF (middleware, URL fallbacks)."""
    return JsonResponse(error.as_dict(), status=error.status)
