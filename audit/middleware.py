"""Lets the audit trail name a request's Django login: the admin's staff user, a signed-in user of the chat page.

auditlog's own middleware is synchronous (under ASGI, a thread hop every request) and reads the login of every
request, a database query even for API calls. This one runs on the event loop and reads nothing: it keeps the
request, whose login is read only when a record is written, by a view that has read it already.
"""

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from audit import trail
from bankagent import context

GetResponse = Callable[[HttpRequest], HttpResponseBase] | Callable[[HttpRequest], Awaitable[HttpResponseBase]]


@contextmanager
def serving(request: HttpRequest) -> Iterator[None]:
    # The actor the request's credentials name is the request's: it must not outlive it in a server's thread.
    tokens = trail.request.set(request), context.actor.set(None)
    try:
        yield
    finally:
        context.actor.reset(tokens[1])
        trail.request.reset(tokens[0])


class AuditRequestMiddleware:
    sync_capable = async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if iscoroutinefunction(self):
            return self._acall(request)
        with serving(request):
            return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        with serving(request):
            return await self.get_response(request)
