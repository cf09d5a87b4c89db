"""Log lines say the request, user, thread and run they were logged in: JSON objects with LOG_FORMAT=json, plain
text with the ids after the message otherwise; never what the customer asked."""

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from pydantic_ai.models.function import FunctionModel

from bankagent import asgi, context
from bankagent.logs import ContextFilter, JSONFormatter, PlainFormatter
from identity.models import APIKey
from runs import runner
from tests.live import ROOT
from tests.test_telemetry import MARKER, QUERY, RunTasks, post
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def runs(monkeypatch) -> RunTasks:
    tasks = RunTasks()
    monkeypatch.setattr(runner, "_RUNS", tasks)
    return tasks


@pytest.fixture
def api_key(transactional_db) -> str:
    return APIKey.objects.create_key(name="log tests")[1]


@pytest.fixture
def json_lines():
    """What the root logger writes through a handler set up as LOG_FORMAT=json sets up the console's."""
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield written
    root.removeHandler(handler)


@pytest.mark.parametrize("path", ["/api/v1/agent/query", "/api/v1/agent/stream"])
async def test_a_runs_log_lines_are_json_objects_with_its_request_user_thread_and_run(
    path, json_lines, runs, api_key, user_id, settings
):
    def broken(messages, info):
        raise RuntimeError("the provider fell over")

    async def broken_stream(messages, info):
        raise RuntimeError("the provider fell over")
        yield ""

    settings.AGENT_MODEL = FunctionModel(broken, stream_function=broken_stream, model_name="broken")
    thread = await Thread.objects.acreate(user_id=user_id, agent_type="general_chat")
    await post(
        asgi.application,
        path,
        {"thread_id": str(thread.pk), "query": QUERY},
        api_key=api_key,
        user_id=user_id,
        request_id="logged-1",
    )
    await runs.finished()
    answer = await Message.objects.aget(thread=thread, role=Message.Role.ASSISTANT)
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    (failed,) = [line for line in lines if line["message"] == "Agent run failed"]
    assert (
        failed.items()
        >= {
            "level": "ERROR",
            "logger": "agents.llm",
            "request_id": "logged-1",
            "user_id": str(user_id),
            "thread_id": str(thread.pk),
            "run_id": str(answer.pk),
        }.items()
    )
    assert "the provider fell over" in failed["exc_info"] and "time" in failed
    assert MARKER not in json_lines.getvalue()


def test_an_id_the_caller_logs_itself_is_kept():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.request_id = "from-the-frame"
    with context.bound(request_id="from-the-socket", thread_id="t"):
        ContextFilter().filter(record)
    line = PlainFormatter("%(message)s").format(record)
    assert line == "hello [request_id=from-the-frame thread_id=t]"


def logged(**variables: str) -> subprocess.CompletedProcess:
    """A line logged outside any request, then one inside a run, by a process set up as the settings say."""
    script = (
        "import django, logging\n"
        "django.setup()\n"
        "from bankagent import context\n"
        "logging.getLogger('bankagent.test').warning('outside')\n"
        "with context.bound(request_id='r-1', user_id='u-1', thread_id='t-1', run_id='m-1'):\n"
        "    logging.getLogger('bankagent.test').warning('inside %s', 2)\n"
    )
    env = {
        **{name: value for name, value in os.environ.items() if name != "LOG_FORMAT"},
        "DJANGO_SETTINGS_MODULE": "bankagent.settings",
        "DJANGO_SECRET_KEY": "log-tests",
        "DATABASE_URL": "sqlite:///:memory:",
        **variables,
    }
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_with_log_format_json_every_line_is_a_json_object_with_the_ids_known():
    done = logged(LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr
    outside, inside = [json.loads(line) for line in done.stderr.splitlines()]
    assert outside.keys() == {"time", "level", "logger", "message"} and outside["message"] == "outside"
    assert (
        inside.items()
        >= {
            "level": "WARNING",
            "logger": "bankagent.test",
            "message": "inside 2",
            "request_id": "r-1",
            "user_id": "u-1",
            "thread_id": "t-1",
            "run_id": "m-1",
        }.items()
    )


def test_plain_logs_stay_plain_with_the_ids_known_after_the_message():
    done = logged()
    assert done.returncode == 0, done.stderr
    outside, inside = done.stderr.splitlines()
    assert outside.endswith(" WARNING bankagent.test outside")
    assert inside.endswith(" WARNING bankagent.test inside 2 [request_id=r-1 user_id=u-1 thread_id=t-1 run_id=m-1]")


def test_an_unknown_log_format_names_itself_at_start_up():
    done = logged(LOG_FORMAT="xml")
    assert done.returncode != 0 and "LOG_FORMAT must be plain or json, not 'xml'" in done.stderr
