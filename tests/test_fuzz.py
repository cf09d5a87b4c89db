"""The API against its own OpenAPI schema: schemathesis generates requests from `/api/schema/` (valid and invalid
ones, every operation, then sequences that follow the schema's links from a created thread) and runs every check
on the answers. It must find nothing.

The application runs in this process, on schemathesis's own event loop thread, so every test is transactional and
waits for the runs it started (streams go on in the background) before the database is flushed.

This module is also the hooks module of a schemathesis CLI run against a live server (SCHEMATHESIS_HOOKS=
tests.test_fuzz, named in schemathesis.toml): its hook makes valid requests act for the demo customer with cursors
the server issued, and its deserializer checks every line of a stream.
"""

import json
import os
import time
from datetime import UTC, datetime

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import ApiKeyAuthConfig

from tests.agui_events import events_of
from tests.ai_sdk import chunks_of

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES_PER_OPERATION = 50
STATEFUL_STEPS = 10
STATEFUL_SCENARIOS = 40
RUNS_TIMEOUT = 30.0


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """A valid request acts for John, the demo customer (bank support answers look his data up), and its cursor is
    one the server issued.

    A cursor is valid only when the server signed it, which no schema can say: a generated string is a cursor the
    server did not issue (400 `invalid_cursor`, pinned in test_api_validation), so valid requests get a real one.
    Invalid requests keep what was generated.
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return case
    setup_django()
    from bank.models import DEMO_USER_ID

    if isinstance(case.headers, dict) and "X-User-ID" in case.headers:
        case.headers["X-User-ID"] = str(DEMO_USER_ID)
    if isinstance(case.query, dict) and isinstance(case.query.get("cursor"), str):
        case.query["cursor"] = issued_cursor(case.operation.path)
    if case.operation.path.endswith("/ui-stream") and isinstance(case.body, dict):
        # Its one new question is the last user message, of text parts: no schema can say "the last".
        question = {"id": "question", "role": "user", "parts": [{"type": "text", "text": "What is my balance?"}]}
        case.body["messages"] = [question]
    if case.operation.path.endswith("/ag-ui") and isinstance(case.body, dict):
        case.body["messages"] = [{"id": "question", "role": "user", "content": "What is my balance?"}]
        # An interrupt to resume is one the server issued (an approval), as a cursor is: none is generated.
        case.body.pop("resume", None)
    return case


def setup_django() -> None:
    import django
    from django.apps import apps

    if not apps.ready:  # a CLI run
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
        django.setup()


def issued_cursor(path: str) -> str:
    from django.core import signing

    from threads.views import MESSAGE_PAGES, THREAD_PAGES

    if path.endswith("/messages"):
        return signing.dumps(["1"], salt=MESSAGE_PAGES.salt)
    position = [datetime.now(UTC).isoformat(), "00000000-0000-4000-8000-000000000000"]
    return signing.dumps(position, salt=THREAD_PAGES.salt)


@pytest.fixture
def fuzz_key(transactional_db) -> str:
    from identity.models import APIKey

    _, key = APIKey.objects.create_key(name="fuzz")
    return key


@pytest.fixture
def credentials(fuzz_key, demo_customer) -> dict[str, str]:
    """The key; valid requests act for the demo customer (see map_case), so he must exist."""
    return {"X-API-Key": fuzz_key}


@pytest.fixture
def api_schema(credentials):
    from bankagent.asgi import application

    loaded = schemathesis.openapi.from_asgi("/api/schema/", application)
    # The key of the schema's ApiKeyAuth scheme, as `[auth.openapi.ApiKeyAuth]` in schemathesis.toml would give it:
    # schemathesis then knows which requests carry it, and tries them without it.
    loaded.config.auth.openapi.schemes["ApiKeyAuth"] = ApiKeyAuthConfig(api_key=credentials["X-API-Key"])
    yield loaded
    wait_for_runs()


def wait_for_runs() -> None:
    """Streamed runs go on after their response: let them save their answers before the database goes."""
    from runs import runner

    deadline = time.monotonic() + RUNS_TIMEOUT
    while runner._RUNS:
        assert time.monotonic() < deadline, f"runs still going after {RUNS_TIMEOUT} s: {runner._RUNS}"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # schemathesis 4.32's lazy schemas rename the test node through `_nodeid`, which pytest 9.2 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schemathesis.deserializer("application/x-ndjson")
def ndjson_events(context: schemathesis.DeserializationContext, response: schemathesis.Response) -> object:
    """The stream, line by line, against the schema's StreamEvent (the media type's schema describes one line):
    a line that does not validate, or events out of order, fail the response. The last line stands for the stream
    in schemathesis's own validation, which expects one value."""
    raw = context.operation.schema.raw_schema
    validator = jsonschema_rs.validator_for({"$ref": "#/components/schemas/StreamEvent", **raw})
    # Lines end with "\n" only: str.splitlines() would also split at U+0085 or U+2028, which JSON text may hold raw.
    lines = response.content.decode().split("\n")
    if lines.pop() != "":
        raise ValueError("the stream does not end with a line break")
    events = [json.loads(line) for line in lines]
    for event in events:
        validator.validate(event)
    names = [event["event"] for event in events]
    in_order = names[:2] == ["message_created", "message_started"] and names[-2:-1] in (["message_complete"], ["error"])
    if not in_order or names.count("done") != 1 or names[-1] != "done":
        raise ValueError(f"events out of order: {names}")
    return events[-1]


@schemathesis.deserializer("text/event-stream")
def server_sent_events(context: schemathesis.DeserializationContext, response: schemathesis.Response) -> object:
    """The AI SDK UI message stream, each chunk read with pydantic-ai's models of the AI SDK's chunks, or the AG-UI
    stream, each event read with the ag-ui-protocol package's models, in order; a stream schemathesis cut short is
    read as far as it goes. Its events, for the schema's own check of each."""
    body = response.content
    read = events_of if context.operation.path.endswith("/ag-ui") else chunks_of
    read(body, whole=not response.stream_cut_short)
    return [{"data": event.removeprefix("data: ")} for event in body.decode().split("\n\n")[:-1]]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_every_operation_answers_as_its_schema_says(case):
    case.call_and_validate()
    wait_for_runs()


def test_sequences_along_the_links_answer_as_the_schema_says(api_schema):
    class Sequences(api_schema.as_state_machine()):
        def teardown(self):
            wait_for_runs()

    Sequences.run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
