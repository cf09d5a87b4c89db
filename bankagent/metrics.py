"""Prometheus metrics: what the service counts, where it counts it (one `record_*` call at each place), and
`GET /metrics`, which reports them to a scraper it lets in.

Under `python -m bankagent.serve` every worker process writes its values to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when the library is first imported) and a scrape adds up every
worker's; in one process without that directory (tests, daphne) the library's default registry holds them.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from rest_framework.exceptions import APIException, MethodNotAllowed

from bankagent.exceptions import AuthenticationFailed, NotAuthenticated, NotFound, error_body, error_response

if TYPE_CHECKING:
    from pydantic_ai.usage import RunUsage

    from runs.keeper import Progress
    from runs.lease import Run

REQUESTS = Counter("bankagent_http_requests", "HTTP requests answered, by URL pattern and status.", ["route", "status"])
RUNS_STARTED = Counter("bankagent_runs_started", "Runs started (their thread taken), by agent.", ["agent"])
RUNS_FINISHED = Counter(
    "bankagent_runs_finished", "Runs ended, by agent and the status their answer was saved with.", ["agent", "status"]
)
RUNS_FAILED = Counter("bankagent_runs_failed", "Runs that failed, by agent and error code.", ["agent", "code"])
# livesum: the values of the live workers, added up; a worker that exits takes its own with it.
RUNS_IN_FLIGHT = Gauge("bankagent_runs_in_flight", "Runs going on now.", multiprocess_mode="livesum")
RUN_SECONDS = Histogram(
    "bankagent_run_duration_seconds",
    "From the thread taken to the answer saved, by agent.",
    ["agent"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
FIRST_TOKEN_SECONDS = Histogram(
    "bankagent_run_time_to_first_token_seconds",
    "From the thread taken to the first token of a streamed answer, by agent.",
    ["agent"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TOKENS = Counter("bankagent_tokens", "Model tokens used, by agent and type (input, output).", ["agent", "type"])
WEBSOCKETS_OPEN = Gauge("bankagent_websockets_open", "Websockets open on a thread.", multiprocess_mode="livesum")
REFUSALS = Counter(
    "bankagent_refusals",
    "Requests and frames refused by a rate limit (kind throttled, scope: the limit) or for want of a run slot "
    "(kind overloaded, scope runs).",
    ["kind", "scope"],
)

UNMATCHED = "unmatched"
"""The route of a request no URL pattern matched: a static file, an unknown path, one refused before routing."""

# Label children by their values: labels() takes a lock and builds a key each call, this a dictionary lookup.
_requests: dict[tuple[str, int], Counter] = {}


def record_request(request: HttpRequest, response: HttpResponseBase) -> None:
    match = request.resolver_match
    key = (match.view_name if match is not None else UNMATCHED, response.status_code)
    counter = _requests.get(key)
    if counter is None:
        counter = _requests[key] = REQUESTS.labels(key[0], str(key[1]))
    counter.inc()


def record_run_started(run: "Run") -> None:
    RUNS_STARTED.labels(run.spec.agent_type).inc()
    RUNS_IN_FLIGHT.inc()


def record_run_ended(run: "Run", progress: "Progress", failure: APIException | None) -> None:
    agent = run.spec.agent_type
    RUNS_IN_FLIGHT.dec()
    RUN_SECONDS.labels(agent).observe(time.monotonic() - run.started)
    if progress.first_token_at is not None:
        FIRST_TOKEN_SECONDS.labels(agent).observe(progress.first_token_at - run.started)
    if failure is None:
        RUNS_FINISHED.labels(agent, run.start.assistant_message.status).inc()
    else:
        RUNS_FINISHED.labels(agent, "failed").inc()
        RUNS_FAILED.labels(agent, failure.default_code).inc()


def record_tokens(run: "Run", usage: "RunUsage") -> None:
    agent = run.spec.agent_type
    TOKENS.labels(agent, "input").inc(usage.input_tokens)
    TOKENS.labels(agent, "output").inc(usage.output_tokens)


def record_websocket(opened: bool) -> None:
    WEBSOCKETS_OPEN.inc(1 if opened else -1)


def record_refusal(kind: str, scope: str) -> None:
    REFUSALS.labels(kind, scope).inc()


class RequestMetricsMiddleware:
    """Counts every response by its URL pattern's name and status; first in MIDDLEWARE, so that the guards'
    refusals count too. It does no I/O, and runs on the event loop under ASGI."""

    sync_capable = async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if iscoroutinefunction(self):
            return self._acall(request)
        response = self.get_response(request)
        record_request(request, response)  # type: ignore[arg-type]
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)  # type: ignore[misc]
        record_request(request, response)
        return response


# A scrape reads every worker's files afresh: one registry, made once, serves them all.
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    _registry = CollectorRegistry()
    MultiProcessCollector(_registry)
else:
    _registry = REGISTRY

_FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")
"""Headers a proxy adds: a request through one comes from the proxy's address, whoever sent it."""


def _digest(value: str) -> bytes:
    # Compared as digests of equal length, so that the comparison's time says nothing of the token's length either.
    return hashlib.sha256(value.encode()).digest()


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """Why `request` may not read the metrics, as the response that says so; None when it may.

    With METRICS_TOKEN set, a scraper must send it (401 otherwise). Without it, only loopback and
    METRICS_ALLOWED_NETWORKS may scrape, and not through a proxy; any other request is answered as a path that does
    not exist would be, as there is nothing an outsider could do to be let in.
    """
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            refused = error_response(NotAuthenticated("An `Authorization: Bearer <token>` header is required."))
        elif not hmac.compare_digest(_digest(given.strip()), _digest(token)):
            refused = error_response(AuthenticationFailed("The bearer token is wrong."))
        else:
            return None
        refused["WWW-Authenticate"] = "Bearer"
        return refused
    if not any(name in request.headers for name in _FORWARDED) and _allowed(request.META.get("REMOTE_ADDR", "")):
        return None
    return error_response(NotFound("There is no endpoint at this path."))


def _allowed(address: str) -> bool:
    try:
        client = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    return client.is_loopback or any(client in network for network in settings.METRICS_ALLOWED_NETWORKS)


@csrf_exempt
async def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics`: every worker's metrics, in the format the scraper asks for (Prometheus text by default,
    OpenMetrics on request)."""
    if (refused := _refusal(request)) is not None:
        return refused
    if request.method not in ("GET", "HEAD"):
        return JsonResponse(error_body(MethodNotAllowed(request.method)), status=405, headers={"Allow": "GET, HEAD"})
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    # Collecting reads a file a worker and metric kind: not on the event loop.
    return HttpResponse(await asyncio.to_thread(encode, _registry), content_type=content_type)
