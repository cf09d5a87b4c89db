"""Request guards and the middleware stack, native to the event loop.

Django's own middleware runs each hook of each middleware in a worker thread under ASGI: about fifteen thread
hand-offs per request. Their hooks do no I/O (the session is saved only when it changed, in one hand-off), so
the variants here run them on the event loop; in a synchronous server they behave exactly as Django's.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security

from bankagent.exceptions import BadHost, PayloadTooLarge, error_response

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
GetResponse = Callable[[HttpRequest], HttpResponseBase] | Callable[[HttpRequest], Awaitable[HttpResponseBase]]


class InlineHooks:
    """For a `MiddlewareMixin` whose hooks do no I/O: run them on the event loop, not in a thread each."""

    get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SecurityMiddleware(InlineHooks, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooks, common.CommonMiddleware):
    pass


class XFrameOptionsMiddleware(InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass


class AuthenticationMiddleware(InlineHooks, auth.AuthenticationMiddleware):
    """Sets the lazy `request.user` / `request.auser`; nothing is read until a view asks."""


class CsrfViewMiddleware(InlineHooks, csrf.CsrfViewMiddleware):
    async def aprocess_view(self, request: HttpRequest, *args: Any) -> HttpResponseBase | None:
        return super().process_view(request, *args)

    def __init__(self, get_response: GetResponse) -> None:
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            # Django hands process_view to a thread unless it is a coroutine function.
            self.process_view = self.aprocess_view  # type: ignore[method-assign]


class SessionMiddleware(sessions.SessionMiddleware):
    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        self.process_request(request)
        response = await self.get_response(request)
        if request.session.modified or settings.SESSION_SAVE_EVERY_REQUEST:
            # Saving writes to the database.
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class MessageMiddleware(messages.MessageMiddleware):
    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        self.process_request(request)
        response = await self.get_response(request)
        storage = request._messages
        if storage.used or storage.added_new:
            # Storing messages may load the session from the database.
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class _Guard:
    """A middleware that works in both modes, with a check that does no I/O."""

    sync_capable = async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        refused = self.refuse(request)
        if iscoroutinefunction(self):
            return self._acall(request, refused)
        return refused or self.get_response(request)

    async def _acall(self, request: HttpRequest, refused: HttpResponse | None) -> HttpResponseBase:
        return refused or await self.get_response(request)

    def refuse(self, request: HttpRequest) -> HttpResponse | None:
        raise NotImplementedError


class HostValidationMiddleware(_Guard):
    """A Host outside DJANGO_ALLOWED_HOSTS gets 400 `bad_host` as JSON (Django would answer an HTML page)."""

    def refuse(self, request: HttpRequest) -> HttpResponse | None:
        try:
            request.get_host()
        except DisallowedHost:
            return error_response(BadHost())
        return None


class BodySizeLimitMiddleware(_Guard):
    """Read the body once, within DATA_UPLOAD_MAX_MEMORY_SIZE, so that an oversized one is a 413 before parsing.

    Under ASGI, ASGIBodyLimit has refused it already; this covers the synchronous handler.
    """

    def refuse(self, request: HttpRequest) -> HttpResponse | None:
        if request.path.startswith("/api/"):
            try:
                request.body  # noqa: B018 - Django checks the size while reading it
            except RequestDataTooBig:
                return error_response(PayloadTooLarge())
        return None


class ASGIBodyLimit:
    """Count HTTP body bytes as they arrive and refuse past the limit, without buffering the rest.

    Django's ASGI handler spools a whole body to disk before any middleware sees it; a chunked upload
    without Content-Length would otherwise be read to its end before being refused.
    """

    def __init__(self, app: ASGIApp) -> None:
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


class ASGIHeadWithoutBody:
    """A HEAD response carries headers only, whichever server runs the application.

    A server that lets body bytes through after the headers (daphne does, past the first 64 KiB chunk)
    desynchronises a keep-alive connection: the client reads them as the next response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # nothing to send until the last one
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app(scope, receive, headers_only)
