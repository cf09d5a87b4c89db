"""Traces through the real ASGI application: a request's span, its run's span and the model's and tools' spans in one
trace, with the request and thread ids, and no message content unless it is asked for.

The tracer provider is the test's own, exporting to memory as each span ends; the run's task is awaited before
the spans are read, as a streamed run goes on after its response.
"""

import asyncio
import contextlib
import copy
import json
import os
import uuid
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from django.core.exceptions import ImproperlyConfigured
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic_ai import Agent
from pydantic_ai.models.function import FunctionModel

from bankagent import asgi, context, telemetry
from bankagent.middleware import ASGIApp
from bankagent.settings import _traces_exporters
from identity.models import APIKey
from identity.tickets import ticket_issue
from runs import runner
from runs.hub import hub
from tests import conftest
from tests.asgi import http_call
from tests.live import LiveServer, request
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 20.0
MARKER = "zebra-quokka-7f3a"
"""Part of every question: no span may say it unless content is captured."""
QUERY = f"What is my balance? {MARKER}"


class RunTasks(conftest.RunTasks):
    async def finished(self) -> None:
        done, pending = await asyncio.wait(self.started, timeout=TIMEOUT)
        assert self.started and not pending, "a run did not end"
        assert all(task.exception() is None for task in done)


@pytest.fixture
def runs(monkeypatch) -> RunTasks:
    tasks = RunTasks()
    monkeypatch.setattr(runner, "_RUNS", tasks)
    return tasks


class Traces:
    """A tracer provider of the test's own, exporting each span to memory as it ends."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(shutdown_on_exit=False)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def application(self, *, capture_content: bool = False) -> ASGIApp:
        """The application as bankagent.asgi builds it, with tracing on through this provider."""
        assert telemetry.setup(tracer_provider=self.provider, capture_content=capture_content)
        return asgi.wrapped(asgi.router)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def traces() -> Iterator[Traces]:
    yield Traces()
    telemetry.teardown()


@pytest.fixture
def issued_key(transactional_db) -> tuple[APIKey, str]:
    return APIKey.objects.create_key(name="telemetry tests")


@pytest.fixture
def api_key(issued_key) -> str:
    return issued_key[1]


@pytest.fixture
def support_thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


async def post(
    app: ASGIApp, path: str, body: dict, *, api_key: str, user_id: uuid.UUID, request_id: str
) -> tuple[int, bytes]:
    """POST `body` as JSON; the response's status and whole body."""
    headers = {"x-api-key": api_key, "x-user-id": str(user_id), "x-request-id": request_id}
    reply = await http_call("POST", path, headers, body, app=app)
    return reply.status, reply.body


def strings_of(span: ReadableSpan) -> list[str]:
    """Every string a span says: its name, its attributes' and its events' values."""
    said = [span.name]
    for attributes in [span.attributes, *(event.attributes for event in span.events)]:
        for value in (attributes or {}).values():
            said.extend(value if isinstance(value, tuple) else [value])
    return [str(value) for value in said]


def one_trace(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    """The spans by name, once they are found to share one trace."""
    assert len({span.context.trace_id for span in spans}) == 1, [span.name for span in spans]
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    return by_name


def assert_one_traced_run(spans: list[ReadableSpan], *, request_span: str, request_id: str, thread: Thread) -> None:
    by_name = one_trace(spans)
    (request,) = by_name[request_span]
    (run,) = by_name["run"]
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert run.parent.span_id == request.context.span_id
    answer = Message.objects.get(thread=thread, role=Message.Role.ASSISTANT)
    assert request.attributes["bankagent.request_id"] == request_id
    assert request.attributes["bankagent.thread_id"] == str(thread.pk)
    assert (
        dict(run.attributes).items()
        >= {
            "bankagent.request_id": request_id,
            "bankagent.thread_id": str(thread.pk),
            "bankagent.run_id": str(answer.pk),
            "bankagent.agent_type": "bank_support",
        }.items()
    )
    model_requests = [span for span in spans if span.attributes.get("gen_ai.operation.name") == "chat"]
    tools = [span for span in spans if span.attributes.get("gen_ai.tool.name") == "customer_balance"]
    assert model_requests and tools
    within_run = {run.context.span_id}
    for span in sorted(spans, key=lambda span: span.start_time):
        if span.parent is not None and span.parent.span_id in within_run:
            within_run.add(span.context.span_id)
    assert {span.context.span_id for span in [*model_requests, *tools]} <= within_run


async def test_a_blocking_query_is_one_trace_from_request_to_saved_answer(
    traces, runs, api_key, user_id, support_thread
):
    app = traces.application()
    status, _ = await post(
        app,
        "/api/v1/agent/query",
        {"thread_id": str(support_thread.pk), "query": QUERY},
        api_key=api_key,
        user_id=user_id,
        request_id="blocking-1",
    )
    assert status == 200
    await runs.finished()
    spans = traces.spans()
    await sync_to_async(assert_one_traced_run)(
        spans, request_span="POST /api/v1/agent/query", request_id="blocking-1", thread=support_thread
    )
    assert not [said for span in spans for said in strings_of(span) if MARKER in said]


async def test_a_streamed_query_is_one_trace_its_background_run_included(
    traces, runs, api_key, user_id, support_thread
):
    app = traces.application()
    status, body = await post(
        app,
        "/api/v1/agent/stream",
        {"thread_id": str(support_thread.pk), "query": QUERY},
        api_key=api_key,
        user_id=user_id,
        request_id="streamed-1",
    )
    assert status == 200 and json.loads(body.splitlines()[-1])["event"] == "done"
    await runs.finished()
    spans = traces.spans()
    await sync_to_async(assert_one_traced_run)(
        spans, request_span="POST /api/v1/agent/stream", request_id="streamed-1", thread=support_thread
    )
    assert not [said for span in spans for said in strings_of(span) if MARKER in said]


async def test_content_is_in_the_model_spans_only_when_asked_for(traces, runs, api_key, user_id, support_thread):
    app = traces.application(capture_content=True)
    await post(
        app,
        "/api/v1/agent/query",
        {"thread_id": str(support_thread.pk), "query": QUERY},
        api_key=api_key,
        user_id=user_id,
        request_id="content-1",
    )
    await runs.finished()
    saying = {span.name for span in traces.spans() if any(MARKER in said for said in strings_of(span))}
    assert saying and not saying & {"POST /api/v1/agent/query", "run"}
    assert any("gen_ai.input.messages" in span.attributes for span in traces.spans() if span.name in saying)


async def test_a_failed_run_has_a_failed_span(traces, runs, api_key, user_id, support_thread, settings):
    def broken(messages, info):
        raise RuntimeError("the provider fell over")

    settings.AGENT_MODEL = FunctionModel(broken, model_name="broken")
    app = traces.application()
    status, _ = await post(
        app,
        "/api/v1/agent/query",
        {"thread_id": str(support_thread.pk), "query": QUERY},
        api_key=api_key,
        user_id=user_id,
        request_id="failed-1",
    )
    assert status == 500
    await runs.finished()
    (run,) = [span for span in traces.spans() if span.name == "run"]
    assert run.status.status_code == StatusCode.ERROR and run.status.description == "internal_error"


@pytest.fixture
async def channel_layer_of_this_test(settings, transactional_db):
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    yield
    if (listener := hub().listener) is not None:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def test_a_websocket_is_traced_with_its_thread_and_its_runs_and_never_its_ticket(
    traces, runs, channel_layer_of_this_test, issued_key, user_id, support_thread
):
    app = traces.application()
    ticket, _ = await sync_to_async(ticket_issue)(
        api_key_id=issued_key[0].pk, user_id=user_id, thread_id=support_thread.pk
    )
    path = f"/ws/v1/threads/{support_thread.pk}/"
    scope = {
        "type": "websocket",
        "path": path,
        "raw_path": path.encode(),
        "query_string": f"ticket={ticket}".encode(),
        "headers": [(b"host", b"localhost"), (b"x-request-id", b"socket-1")],
        "subprotocols": [],
        "client": ("127.0.0.1", 5000),
        "server": ("localhost", 80),
    }
    ws = ApplicationCommunicator(app, scope)
    await ws.send_input({"type": "websocket.connect"})
    assert (await ws.receive_output(timeout=TIMEOUT))["type"] == "websocket.accept"
    await ws.send_input({"type": "websocket.receive", "text": json.dumps({"type": "query", "query": QUERY})})
    while json.loads((await ws.receive_output(timeout=TIMEOUT))["text"])["event"] != "done":
        pass
    await runs.finished()
    await ws.send_input({"type": "websocket.disconnect", "code": 1000})
    await ws.wait(timeout=TIMEOUT)
    spans = traces.spans()
    await sync_to_async(assert_one_traced_run)(
        spans, request_span="/ws/v1/threads/{id}/", request_id="socket-1", thread=support_thread
    )
    (socket,) = [span for span in spans if span.name == "/ws/v1/threads/{id}/"]
    assert socket.attributes["http.url"].endswith("?ticket=REDACTED")
    assert not [said for span in spans for said in strings_of(span) if ticket in said or MARKER in said]


def test_off_the_application_is_not_wrapped_and_nothing_is_instrumented():
    assert not telemetry.setup()  # the tests' environment names no exporter
    assert asgi.application.app is asgi.router
    assert telemetry.traced(asgi.router) is asgi.router
    assert Agent._instrument_default is False
    assert context.on_bind is None


OTEL_VARIABLES = [
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
]


@pytest.mark.parametrize(
    ("variables", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "OTLP, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp"]),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",  # for something else: traces say their own
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            ["otlp"],
        ),
    ],
)
def test_traces_are_off_unless_the_standard_variables_ask_for_them(monkeypatch, variables, exporters):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert _traces_exporters() == exporters


@pytest.mark.parametrize(
    ("variables", "refused"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER must name otlp, console or none, not 'jaeger'"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            r"PROTOCOL must be http/protobuf \(OTLP over HTTP\), not 'grpc'",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED must be on or off"),
    ],
)
def test_a_tracing_variable_the_service_cannot_follow_names_itself_at_start_up(monkeypatch, variables, refused):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ImproperlyConfigured, match=refused):
        _traces_exporters()


def test_a_granian_worker_traces_as_the_variables_say_and_sends_its_last_spans_as_it_stops(tmp_path):
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("OTEL_")},
        "DATABASE_URL": "sqlite:///:memory:",
        "DJANGO_SECRET_KEY": "telemetry-test",
        "LOG_LEVEL": "WARNING",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "bankagent-telemetry-test",
    }
    env.pop("REDIS_URL", None)
    server = LiveServer("granian", env, tmp_path / "granian.log")
    server.start()
    try:
        assert request(server.port, "GET", "/api/v1/nowhere", {"X-Request-ID": "live-1"}).status == 404
    finally:
        server.stop()  # long before the batch's 5 s are up: the span is sent as the worker stops
    output = server.log.read_text()
    assert '"bankagent.request_id": "live-1"' in output, server.log_tail()
    spans = json.loads("[" + output[output.index("{") : output.rindex("}") + 1].replace("}\n{", "},{") + "]")
    (span,) = [span for span in spans if span["attributes"].get("bankagent.request_id") == "live-1"]
    assert span["name"] == "GET /api/v1/nowhere" and span["kind"] == "SpanKind.SERVER"
    assert span["resource"]["attributes"]["service.name"] == "bankagent-telemetry-test"
