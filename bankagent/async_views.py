"""DRF views whose handlers run on the event loop, for the endpoints that run an agent.

DRF's own views are synchronous: under ASGI each request then hops to a worker thread for the view, again
to render, and the agent run hops back to the event loop. Here the handler is a coroutine, DRF's checks
(authentication, permissions, throttles) run inline when they need no I/O, or else in one hop, and the
response is rendered inline.
"""

import inspect

from django.core.exceptions import SynchronousOnlyOperation
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bankagent.db import db
from bankagent.throttling import throttling_on
from identity.authentication import credentials_cached


class AsyncAPIView(APIView):
    async def dispatch(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
        self.args, self.kwargs = args, kwargs
        drf_request = self.initialize_request(request, *args, **kwargs)
        self.request = drf_request
        self.headers = self.default_response_headers
        try:
            if self._checks_need_io(drf_request):
                await db(self.initial)(drf_request, *args, **kwargs)
            else:
                try:
                    self.initial(drf_request, *args, **kwargs)
                except SynchronousOnlyOperation:
                    # The key's verification lapsed since it was found cached: it is verified in a hop after all.
                    await db(self.initial)(drf_request, *args, **kwargs)
            method = drf_request.method.lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            response = (handler or self.http_method_not_allowed)(drf_request, *args, **kwargs)
            if inspect.isawaitable(response):
                response = await response
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(drf_request, response, *args, **kwargs)
        return _rendered(self.response)

    def _checks_need_io(self, request: Request) -> bool:
        """Throttles count in the cache; a key not seen lately, or a session, is read from the database."""
        if throttling_on() and self.throttle_classes:
            return True
        return bool(self.authentication_classes) and not credentials_cached(request)


def _rendered(response: HttpResponseBase) -> HttpResponseBase:
    """A DRF Response as a plain one: Django would hand its deferred rendering to a worker thread."""
    if not isinstance(response, Response):
        return response
    response.render()
    plain = HttpResponse(response.content, status=response.status_code)
    for name, value in response.items():
        plain[name] = value
    return plain
