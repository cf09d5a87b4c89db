"""OpenTelemetry traces: a request's span, its run's span and the model's and tools' spans, in one trace.

Off unless the standard variables ask for it (`settings.TRACES_EXPORTERS`). Off, nothing is installed or wrapped:
the application is the one it would be without this module, and a run opens no span. On, each process (each
granian worker) sets it up once as it loads the application:

- the request's span comes from the OpenTelemetry ASGI middleware, inside the request id's so that it knows it;
- a run's span (`run_span`) wraps the run from the model's first call to its saved answer. The run's task is
  created inside the request's span and copies its context, so a streamed run stays in its request's trace after
  the response has ended; an answer the sweeper finishes has a trace of its own;
- pydantic-ai's own instrumentation gives the model requests' and tool calls' spans, under the run's;
- a thread, user or run id bound in `bankagent.context` is also set on the span current there.

No message content is recorded unless OTEL_CAPTURE_CONTENT is on, and no query string value (a websocket's
ticket is one) or secret header ever is.
"""

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.conf import settings
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings

from bankagent import context
from bankagent.middleware import ASGIApp, Scope

if TYPE_CHECKING:
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from rest_framework.exceptions import APIException

    from runs.lease import Run

# The SDK, its exporters and the ASGI instrumentation are imported only once tracing is on: a process that does
# not trace never loads them.

ATTRIBUTE_PREFIX = "bankagent."
SECRET_HEADERS = ["x-api-key", "authorization", "cookie", "set-cookie", "x-csrftoken"]
"""Never recorded, even when OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST names them."""
_ID_SEGMENT = re.compile(r"/[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}(?=/|$)")


@dataclass(frozen=True)
class Tracing:
    provider: trace.TracerProvider
    tracer: Tracer


_tracing: Tracing | None = None


def setup(tracer_provider: trace.TracerProvider | None = None, *, capture_content: bool | None = None) -> bool:
    """Turn tracing on in this process, with the provider given (tests pass their own) or, when the settings ask
    for it, one exporting as they say; whether it is on. Content is captured as OTEL_CAPTURE_CONTENT says unless
    `capture_content` is given."""
    global _tracing
    if tracer_provider is None:
        if not settings.TRACES_EXPORTERS:
            return False
        tracer_provider = _provider_from_settings()
        trace.set_tracer_provider(tracer_provider)  # for any other instrumentation the deployment adds
    capture = settings.OTEL_CAPTURE_CONTENT if capture_content is None else capture_content
    Agent.instrument_all(
        InstrumentationSettings(
            tracer_provider=tracer_provider, include_content=capture, include_binary_content=capture
        )
    )
    _tracing = Tracing(tracer_provider, tracer_provider.get_tracer("bankagent"))
    context.on_bind = _annotate
    return True


def teardown() -> None:
    """Turn tracing off again (tests)."""
    global _tracing
    Agent.instrument_all(False)
    context.on_bind = None
    _tracing = None


def _provider_from_settings() -> "TracerProvider":
    import multiprocessing.util

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Each exporter reads its endpoint, headers, timeout and compression from the standard OTEL_EXPORTER_OTLP_*
    # variables; the provider reads OTEL_TRACES_SAMPLER and OTEL_RESOURCE_ATTRIBUTES.
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.OTEL_SERVICE_NAME}), shutdown_on_exit=False
    )
    for name in settings.TRACES_EXPORTERS:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    # A granian worker ends with os._exit, which skips atexit but runs multiprocessing's finalizers (as a process of
    # its own does at exit): the spans still queued, those of runs interrupted by the shutdown among them, are sent.
    multiprocessing.util.Finalize(provider, provider.shutdown, exitpriority=0)
    return provider


def _exporter(name: str) -> "SpanExporter":
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def traced(app: ASGIApp) -> ASGIApp:
    """`app` with a span for each HTTP request and websocket when tracing is on; `app` itself when it is off."""
    if _tracing is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.util.http import get_custom_headers, get_excluded_urls

    return OpenTelemetryMiddleware(
        app,
        excluded_urls=get_excluded_urls("ASGI"),  # OTEL_PYTHON_ASGI_EXCLUDED_URLS or OTEL_PYTHON_EXCLUDED_URLS
        default_span_details=_span_details,
        server_request_hook=_request_started,
        tracer_provider=_tracing.provider,
        http_capture_headers_sanitize_fields=[
            *SECRET_HEADERS,
            *get_custom_headers("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"),
        ],
        # A span for every body chunk of a stream and every websocket frame would outnumber all the others.
        exclude_spans=["receive", "send"],
    )


def _span_details(scope: Scope) -> tuple[str, dict]:
    """Span names alike for every thread, message or approval: `GET /api/v1/threads/{id}/messages`."""
    path = _ID_SEGMENT.sub("/{id}", scope.get("path", ""))
    method = scope.get("method")
    return (f"{method} {path}" if method else path), {}


def _request_started(span: Span, scope: Scope) -> None:
    if not span.is_recording():
        return
    if (rid := context.request_id.get()) is not None:
        span.set_attribute(ATTRIBUTE_PREFIX + "request_id", rid)
    if not scope.get("query_string"):
        return
    # The middleware records the query string as it came (OpenTelemetry redacts only a few cloud signatures), and a
    # websocket's ticket is in it: its names are kept, not its values.
    recorded = getattr(span, "attributes", None) or {}
    for name in ("http.url", "http.target"):
        if isinstance(url := recorded.get(name), str) and "?" in url:
            parts = urlsplit(url)
            span.set_attribute(name, urlunsplit(parts._replace(query=_redacted(parts.query))))
    if isinstance(query := recorded.get("url.query"), str):
        span.set_attribute("url.query", _redacted(query))


def _redacted(query: str) -> str:
    return urlencode([(name, "REDACTED") for name, _ in parse_qsl(query, keep_blank_values=True)])


def _annotate(values: dict[str, str]) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({ATTRIBUTE_PREFIX + name: value for name, value in values.items()})


_UNTRACED = nullcontext()


def run_span(run: "Run", outcome: "asyncio.Future[APIException | None]") -> AbstractContextManager[object]:
    """A span for the block that runs `run`, failed when `outcome` ends up an error; nothing when tracing is off."""
    if _tracing is None:
        return _UNTRACED
    return _run_span(_tracing.tracer, run, outcome)


@contextmanager
def _run_span(tracer: Tracer, run: "Run", outcome: "asyncio.Future[APIException | None]") -> Iterator[None]:
    attributes = {
        "thread_id": str(run.start.thread.pk),
        "run_id": str(run.message_id),
        "agent_type": run.start.thread.agent_type,
        "request_id": context.request_id.get(),
    }
    with tracer.start_as_current_span(
        "run", attributes={ATTRIBUTE_PREFIX + name: value for name, value in attributes.items() if value is not None}
    ) as span:
        try:
            yield
        finally:
            if outcome.done() and not outcome.cancelled() and (failure := outcome.exception() or outcome.result()):
                # Its code, not its message: a message may quote what the model or the customer said.
                span.set_status(Status(StatusCode.ERROR, getattr(failure, "code", failure.default_code)))
