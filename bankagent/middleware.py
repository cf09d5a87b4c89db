"""Request guards that must run before any view: they answer in the contract's JSON error shape."""

from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import HttpRequest, HttpResponse

from bankagent.exceptions import BadHost, PayloadTooLarge, error_response

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HostValidationMiddleware:
    """A Host outside DJANGO_ALLOWED_HOSTS gets 400 `bad_host` as JSON (Django would answer an HTML page)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            request.get_host()
        except DisallowedHost:
            return error_response(BadHost())
        return self.get_response(request)


class BodySizeLimitMiddleware:
    """Read the body once, within DATA_UPLOAD_MAX_MEMORY_SIZE, so that an oversized one is a 413 before parsing."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/api/"):
            try:
                request.body  # noqa: B018 - Django checks the size while reading it
            except RequestDataTooBig:
                return error_response(PayloadTooLarge())
        return self.get_response(request)


class ASGIBodyLimit:
    """Count HTTP body bytes as they arrive and refuse past the limit, without buffering the rest.

    Django's ASGI handler spools a whole body to disk before any middleware sees it; a chunked upload
    without Content-Length would otherwise be read to its end before being refused.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_too_large(send)
        buffered, size = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await _send_too_large(send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        if declared is None:
            # The body is whole now: say how long it is, or DRF would read a chunked body as empty.
            scope = {**scope, "headers": [*scope.get("headers", []), (b"content-length", str(size).encode())]}
        return await self.app(scope, replay, send)


async def _send_too_large(send: Send) -> None:
    body = error_response(PayloadTooLarge()).content
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
