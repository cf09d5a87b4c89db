"""GET /metrics: what it counts (runs through the real ASGI application), who may read it, and the sum of every
worker's values when two worker processes serve.

Metrics are process-wide and other tests count too: each test compares a scrape after with a scrape before.
"""

import asyncio
import contextlib
import copy
import glob
import json
import os
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from pydantic_ai import UnexpectedModelBehavior
from pydantic_ai.models.function import FunctionModel

from bankagent import serve
from bankagent.asgi import application
from bankagent.settings import _networks
from bankagent.throttling import PROCESS_COUNTS
from identity.models import APIKey
from tests.asgi import Reply, http_call
from tests.live import TIMEOUT, LiveServer, poll, request, server_env
from threads.models import Thread

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "a-scraper-token-of-the-tests"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def changed(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def call(
    method: str,
    path: str,
    *,
    body: object = None,
    headers: dict[str, str] | None = None,
    client: str = "127.0.0.1",
) -> Reply:
    """One request through the application the server runs, read to its end (an NDJSON stream to `done`)."""
    return await http_call(method, path, headers, body, client=client)


async def scrape() -> Samples:
    answer = await call("GET", "/metrics")
    assert answer.status == 200, answer.body
    return parse(answer.body.decode())


@pytest.fixture(autouse=True)
def _a_layer_of_this_loop_and_no_renewals(settings):
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    settings.RUN_LEASE_SECONDS = settings.RUN_CHECKPOINT_SECONDS = 3600


@pytest.fixture
def headers(transactional_db, user_id) -> dict[str, str]:
    _, key = APIKey.objects.create_key(name="metrics")
    return {"x-api-key": key, "x-user-id": str(user_id)}


@pytest.fixture
def chat_threads(transactional_db, user_id):
    def make(count: int) -> list[Thread]:
        return [Thread.objects.create(user_id=user_id, agent_type="general_chat") for _ in range(count)]

    return make


# What is counted


async def test_runs_blocking_streamed_and_failed_are_counted_by_agent_status_and_error(
    headers, chat_threads, use_model
):
    blocking, streamed, failing = await asyncio.to_thread(chat_threads, 3)
    before = await scrape()

    answered = await call(
        "POST", "/api/v1/agent/query", body={"thread_id": str(blocking.pk), "query": "Hi"}, headers=headers
    )
    stream = await call(
        "POST", "/api/v1/agent/stream", body={"thread_id": str(streamed.pk), "query": "Hi"}, headers=headers
    )
    read = await call("GET", f"/api/v1/threads/{streamed.pk}", headers=headers)

    def broken(messages: object, info: object) -> None:
        raise UnexpectedModelBehavior("the model said nonsense")

    use_model(broken)
    failed = await call(
        "POST", "/api/v1/agent/query", body={"thread_id": str(failing.pk), "query": "Hi"}, headers=headers
    )
    after = await scrape()

    assert (answered.status, stream.status, read.status, failed.status) == (200, 200, 200, 502)
    assert json.loads(stream.body.splitlines()[-1])["event"] == "done"
    counted = {
        ("bankagent_http_requests_total", "agent-query", "200"): 1,
        ("bankagent_http_requests_total", "agent-stream", "200"): 1,
        ("bankagent_http_requests_total", "thread-detail", "200"): 1,
        ("bankagent_http_requests_total", "agent-query", "502"): 1,
    }
    for (name, route, status), count in counted.items():
        assert changed(before, after, name, route=route, status=status) == count, (route, status)
    chat = {"agent": "general_chat"}
    assert changed(before, after, "bankagent_runs_started_total", **chat) == 3
    assert changed(before, after, "bankagent_runs_finished_total", **chat, status="complete") == 2
    assert changed(before, after, "bankagent_runs_finished_total", **chat, status="failed") == 1
    assert changed(before, after, "bankagent_runs_failed_total", **chat, code="model_error") == 1
    assert changed(before, after, "bankagent_runs_in_flight") == 0
    assert changed(before, after, "bankagent_run_duration_seconds_count", **chat) == 3
    # Only the streamed answer has a first token.
    assert changed(before, after, "bankagent_run_time_to_first_token_seconds_count", **chat) == 1
    assert changed(before, after, "bankagent_tokens_total", **chat, type="input") > 0
    assert changed(before, after, "bankagent_tokens_total", **chat, type="output") > 0
    # Routes are URL patterns' names: no path with its ids becomes a label.
    labels = {label for _, labelset in after for _, label in labelset}
    assert not any(str(thread.pk) in label for thread in (blocking, streamed, failing) for label in labels)


async def test_a_run_in_flight_is_counted_until_it_ends(headers, chat_threads, settings):
    (thread,) = await asyncio.to_thread(chat_threads, 1)
    answering, go_on = asyncio.Event(), asyncio.Event()

    async def held(messages: object, info: object):
        answering.set()
        await go_on.wait()
        yield "Done."

    settings.AGENT_MODEL = FunctionModel(stream_function=held, model_name="held")
    before = await scrape()
    stream = asyncio.ensure_future(
        call("POST", "/api/v1/agent/stream", body={"thread_id": str(thread.pk), "query": "Hi"}, headers=headers)
    )
    await asyncio.wait_for(answering.wait(), TIMEOUT)
    during = await scrape()
    go_on.set()
    assert (await stream).status == 200
    after = await scrape()

    assert changed(before, during, "bankagent_runs_in_flight") == 1
    assert changed(before, after, "bankagent_runs_in_flight") == 0


async def test_open_websockets_are_counted_until_they_close(headers, chat_threads):
    (thread,) = await asyncio.to_thread(chat_threads, 1)
    before = await scrape()
    socket = WebsocketCommunicator(
        application,
        f"/ws/v1/threads/{thread.pk}/",
        headers=[(name.encode(), value.encode()) for name, value in headers.items()],
    )
    accepted, _ = await socket.connect(timeout=TIMEOUT)
    assert accepted
    opened = await scrape()
    await socket.disconnect(timeout=TIMEOUT)
    closed = await scrape()
    # Without a key: accepted, to be told why, and closed.
    refused = WebsocketCommunicator(application, f"/ws/v1/threads/{thread.pk}/")
    await refused.connect(timeout=TIMEOUT)
    while (await refused.receive_output(timeout=TIMEOUT))["type"] != "websocket.close":
        pass
    with contextlib.suppress(Exception):
        await refused.disconnect(timeout=TIMEOUT)
    after = await scrape()

    assert changed(before, opened, "bankagent_websockets_open") == 1
    assert changed(before, closed, "bankagent_websockets_open") == 0
    assert changed(before, after, "bankagent_websockets_open") == 0


async def test_throttled_and_overloaded_refusals_are_counted_by_kind(headers, chat_threads, settings):
    (thread,) = await asyncio.to_thread(chat_threads, 1)
    await asyncio.to_thread(cache.clear)
    PROCESS_COUNTS.clear()
    before = await scrape()

    settings.THROTTLE_RATES = {"key": "1/min"}
    first = await call("GET", "/api/v1/threads", headers=headers)
    throttled = await call("GET", "/api/v1/threads", headers=headers)
    settings.THROTTLE_RATES = {}
    settings.RUN_CONCURRENCY = 0
    overloaded = await call(
        "POST", "/api/v1/agent/query", body={"thread_id": str(thread.pk), "query": "Hi"}, headers=headers
    )
    after = await scrape()
    await asyncio.to_thread(cache.clear)

    assert (first.status, throttled.status, overloaded.status) == (200, 429, 503)
    assert changed(before, after, "bankagent_refusals_total", kind="throttled", scope="key") == 1
    assert changed(before, after, "bankagent_refusals_total", kind="overloaded", scope="runs") == 1
    assert changed(before, after, "bankagent_http_requests_total", route="thread-list", status="429") == 1
    assert changed(before, after, "bankagent_runs_started_total", agent="general_chat") == 0


# Who may read them


def test_without_a_token_loopback_may_scrape_in_prometheus_text_or_openmetrics(settings):
    settings.METRICS_TOKEN = ""
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        response = Client(REMOTE_ADDR=address).get("/metrics")
        assert response.status_code == 200, address
        assert response["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "bankagent_http_requests_total" in {family.name + "_total" for family in families(response)}
    openmetrics = Client().get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert openmetrics["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.content.endswith(b"# EOF\n")
    assert Client().head("/metrics").status_code == 200


def families(response) -> list:
    return list(text_string_to_metric_families(response.content.decode()))


def assert_not_found(response) -> None:
    """The answer to a path that does not exist, to the byte: an outsider learns nothing of /metrics."""
    assert response.status_code == 404
    assert response.content == Client().get("/api/v1/no-such-endpoint").content
    assert "WWW-Authenticate" not in response


def test_without_a_token_other_addresses_and_proxied_requests_get_not_found(settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ()
    for address in ("10.1.2.3", "192.168.0.7", "2001:db8::1", "not-an-address", ""):
        assert_not_found(Client(REMOTE_ADDR=address).get("/metrics"))
    assert_not_found(Client(REMOTE_ADDR="10.1.2.3").post("/metrics"))
    # Through a proxy on this machine every client would be loopback.
    for header in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP"):
        assert_not_found(Client(**{header: "203.0.113.9"}).get("/metrics"))


def test_allowed_networks_may_scrape_without_a_token(settings, monkeypatch):
    monkeypatch.setenv("METRICS_ALLOWED_NETWORKS", " 10.0.0.0/8, 2001:db8::/32,192.168.5.5 ")
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = _networks("METRICS_ALLOWED_NETWORKS")
    for address in ("10.200.1.2", "2001:db8::7", "192.168.5.5", "::ffff:10.0.0.1"):
        assert Client(REMOTE_ADDR=address).get("/metrics").status_code == 200, address
    for address in ("11.0.0.1", "192.168.5.6", "2001:db9::1"):
        assert_not_found(Client(REMOTE_ADDR=address).get("/metrics"))


@pytest.mark.parametrize("networks", ["10.0.0.0/33", "localhost", "10.0.0.0/8;192.168.0.0/16"])
def test_malformed_allowed_networks_stop_the_settings_naming_the_variable(monkeypatch, networks):
    monkeypatch.setenv("METRICS_ALLOWED_NETWORKS", networks)
    with pytest.raises(ImproperlyConfigured, match="METRICS_ALLOWED_NETWORKS"):
        _networks("METRICS_ALLOWED_NETWORKS")


def test_with_a_token_only_its_bearer_may_scrape_from_anywhere(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOWED_NETWORKS = ()
    for address in ("127.0.0.1", "203.0.113.9"):
        assert Client(REMOTE_ADDR=address, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").get("/metrics").status_code == 200
    assert Client(HTTP_AUTHORIZATION=f"bearer  {TOKEN} ").get("/metrics").status_code == 200

    refusals = {
        None: "not_authenticated",
        "": "not_authenticated",
        "Bearer": "not_authenticated",
        f"Basic {TOKEN}": "not_authenticated",
        TOKEN: "not_authenticated",
        "Bearer wrong": "authentication_failed",
        f"Bearer {TOKEN}x": "authentication_failed",
        f"Bearer {TOKEN[:-1]}": "authentication_failed",
        "Bearer tökén": "authentication_failed",
    }
    for authorization, code in refusals.items():
        extra = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
        response = Client(**extra).get("/metrics")  # loopback too needs the token
        assert response.status_code == 401, authorization
        assert response.json()["error"]["code"] == code
        assert response["WWW-Authenticate"] == "Bearer"
        assert TOKEN.encode() not in response.content


def test_other_methods_are_405_with_allow_once_let_in(settings):
    settings.METRICS_TOKEN = ""
    response = Client().post("/metrics", data="{}", content_type="application/json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response["Allow"] == "GET, HEAD"


# Several worker processes


def test_serve_wipes_an_operators_directory_of_earlier_files(tmp_path, monkeypatch):
    given = tmp_path / "metrics"
    given.mkdir()
    for stale in ("counter_123.db", "gauge_livesum_123.db", "histogram_7.db"):
        (given / stale).write_bytes(b"earlier server")
    (given / "README").write_text("the operator's")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))

    assert serve.metrics_dir() is None  # the operator's: left in place when the server stops
    assert sorted(path.name for path in given.iterdir()) == ["README"]

    created = tmp_path / "not-yet" / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(created))
    assert serve.metrics_dir() is None
    assert created.is_dir()


def test_serve_makes_a_fresh_private_directory_when_none_is_set(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "restored after the test")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    # Left by servers killed with all their workers, by one that is running, and by something else.
    dead, running, other = (
        tmp_path / name
        for name in (
            f"bankagent-metrics-{gone.pid}-abc",
            f"bankagent-metrics-{os.getpid()}-def",
            "bankagent-metrics-ghi",
        )
    )
    for directory in (dead, running, other):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")

    made = serve.metrics_dir()

    assert made is not None and os.environ["PROMETHEUS_MULTIPROC_DIR"] == made
    assert os.path.dirname(made) == str(tmp_path)
    assert os.listdir(made) == []
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert (dead.exists(), running.exists(), other.exists()) == (False, True, True)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL, which the server process shares")
@pytest.mark.parametrize("stop", ["stopped", "master killed"])
def test_serves_private_directory_goes_with_the_server(tmp_path, stop):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = LiveServer("granian", server_env(TMPDIR=str(temporary)), tmp_path / "granian.log")
    server.start(healthy=True)
    try:
        assert server.process is not None
        [made] = temporary.glob("bankagent-metrics-*")
        assert request(server.port, "GET", "/metrics").status == 200
        assert list(made.glob("counter_*.db"))
        if stop == "stopped":
            server.stop()
        else:
            server.process.kill()  # the master alone: its worker, stopping, removes the directory
            server.process.wait()
        poll(lambda: not made.exists())
    finally:
        server.stop()


@pytest.fixture
def two_workers(tmp_path) -> Iterator[tuple[LiveServer, str]]:
    """`python -m bankagent.serve` with two workers on the test database and Redis, the demo model answering; its
    metrics directory is the test's, to see which worker served what."""
    directory = tmp_path / "metrics"
    env = server_env(
        REDIS_URL=django_settings.REDIS_URL,
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(directory),
        METRICS_TOKEN=TOKEN,
    )
    server = LiveServer("granian", env, tmp_path / "granian.log", workers=2)
    try:
        server.start(healthy=True)
        yield server, str(directory)
    finally:
        server.stop()


def served_by_worker(directory: str) -> dict[int, float]:
    """Blocking queries each worker answered, from its own file."""
    served = {}
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        pid = int(os.path.basename(path).removeprefix("counter_").removesuffix(".db"))
        served[pid] = sum(
            sample.value
            for metric in MultiProcessCollector.merge([path])
            for sample in metric.samples
            if sample.name == "bankagent_http_requests_total" and sample.labels["route"] == "agent-query"
        )
    return served


def scrape_live(port: int) -> Samples:
    response = request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, response.body
    return parse(response.body.decode())


@pytest.mark.skipif(
    not django_settings.REDIS_URL or connection.vendor != "postgresql",
    reason="needs REDIS_URL and PostgreSQL, which the worker processes share",
)
def test_two_workers_metrics_add_up_every_workers_and_outlive_a_killed_one(two_workers, caller):
    server, directory = two_workers
    sent = 0

    def ask(thread: Thread) -> int:
        body = {"thread_id": str(thread.pk), "query": "Hello"}
        return request(server.port, "POST", "/api/v1/agent/query", headers=caller.headers, body=body).status

    with ThreadPoolExecutor(4) as pool:
        # New connections land on either worker: ask until both have answered some.
        while len([count for count in served_by_worker(directory).values() if count]) < 2:
            assert sent < 200, f"one worker answered every query: {served_by_worker(directory)}"
            threads = [Thread.objects.create(user_id=caller.user_id, agent_type="general_chat") for _ in range(8)]
            assert list(pool.map(ask, threads)) == [200] * len(threads)
            sent += len(threads)

    served = served_by_worker(directory)
    assert sum(served.values()) == sent
    # Whichever worker answers a scrape, it reports every worker's counts.
    for _ in range(4):
        samples = scrape_live(server.port)
        assert value(samples, "bankagent_http_requests_total", route="agent-query", status="200") == sent
        assert value(samples, "bankagent_runs_started_total", agent="general_chat") == sent
        assert value(samples, "bankagent_runs_finished_total", agent="general_chat", status="complete") == sent
        assert value(samples, "bankagent_run_duration_seconds_count", agent="general_chat") == sent
        assert value(samples, "bankagent_runs_in_flight") == 0

    # A worker killed takes its live gauges with it; what it counted stays counted.
    killed = next(iter(served))
    assert os.path.exists(os.path.join(directory, f"gauge_livesum_{killed}.db"))
    os.kill(killed, signal.SIGKILL)
    poll(lambda: not os.path.exists(os.path.join(directory, f"gauge_livesum_{killed}.db")), TIMEOUT)
    samples = scrape_live(server.port)
    assert value(samples, "bankagent_http_requests_total", route="agent-query", status="200") == sent
    assert value(samples, "bankagent_runs_started_total", agent="general_chat") == sent
