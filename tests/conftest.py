import asyncio
import contextlib
import copy
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from asgiref.sync import SyncToAsync
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from django.db import OperationalError, connections
from django.db.models.signals import pre_save
from django.http import HttpResponse
from django.test import Client, override_settings
from pydantic_ai import models
from pydantic_ai.models.function import FunctionModel
from rest_framework.test import APIClient

import runs.lease
import runs.runner
from bank.models import DEMO_USER_ID, Customer
from bank.seed import demo_customer_create
from identity.authentication import _lookups as socket_credential_lookups
from identity.authentication import _open as open_socket_credentials
from identity.authentication import _recent as recent_keys
from identity.models import APIKey
from runs.hub import Hub
from runs.keeper import keeper_db
from runs.services import RunStart, run_begin, run_finish
from threads.models import Message, Thread

models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture(autouse=True)
def _static_files_without_manifest(settings):
    # Tests render pages in-process without running collectstatic, which the hashed names need.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _fast_demo_model(settings):
    settings.AGENT_MODEL = "demo"
    settings.DEMO_MODEL_DELAY_MS = 0


@pytest.fixture(autouse=True)
def _stream_every_chunk(settings):
    # Tests watch partial outputs grow chunk by chunk; coalescing under load has tests of its own.
    settings.STREAM_DEBOUNCE_MS = 0


@pytest.fixture(autouse=True)
def _no_throttling(settings):
    # Rate limits have tests of their own; elsewhere they would only make test order matter.
    settings.THROTTLE_RATES = {}


@pytest.fixture(autouse=True)
def _keys_verified_afresh():
    recent_keys.clear()
    open_socket_credentials.clear()
    socket_credential_lookups.clear()


@pytest.fixture(autouse=True)
def _close_worker_thread_connections():
    yield
    # Async code reaches the database from asgiref's worker thread; its connection must not outlive the test
    # database (PostgreSQL refuses to drop a database still in use).
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()
    keeper_db.close_connections()


@pytest.fixture
def redis_cache_down():
    """Call it to make the cache a Redis that is down (nothing listens on port 1), or the Redis at the URL given, until
    the test ends."""
    enabled = []

    def down(url: str = "redis://127.0.0.1:1/0") -> None:
        cache_settings = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
        override = override_settings(CACHES={"default": cache_settings | {"OPTIONS": settings.REDIS_TIMEOUTS}})
        override.enable()
        enabled.append(override)

    yield down
    for override in enabled:
        override.disable()


class SilentServer:
    """A server that accepts connections and never answers, as a Redis does in a brown-out (not one that is down,
    which refuses them): what is sent to it waits for ever. It counts the connections it was offered."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"

    @property
    def connections(self) -> int:
        return len(self.held)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed: the test is over
            while True:
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        self.listener.close()
        for held in self.held:
            held.close()


@pytest.fixture
def silent_redis() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def demo_customer(transactional_db) -> Customer:
    """John, as the data migration seeds him: a transactional test's flush empties every table."""
    demo_customer_create()
    return Customer.objects.get(user_id=DEMO_USER_ID)


@pytest.fixture
def api_key(db) -> str:
    _, key = APIKey.objects.create_key(name="tests")
    return key


@pytest.fixture
def user_id() -> uuid.UUID:
    return DEMO_USER_ID


@pytest.fixture
def other_user_id() -> uuid.UUID:
    return uuid.UUID("00000000-0000-4000-8000-000000000002")


@pytest.fixture
def client(api_key, user_id) -> APIClient:
    """A client authenticated as the demo customer."""
    api = APIClient()
    api.credentials(HTTP_X_API_KEY=api_key, HTTP_X_USER_ID=str(user_id))
    return api


@pytest.fixture
def anonymous() -> APIClient:
    return APIClient()


@pytest.fixture
def make_thread(db, user_id):
    def make(*, user: uuid.UUID | None = None, agent_type: str = "bank_support", **fields) -> Thread:
        return Thread.objects.create(user_id=user or user_id, agent_type=agent_type, **fields)

    return make


def begin_run(thread: Thread, query: str = "Hello", *, lease_seconds: float = 30) -> RunStart:
    """A run begun on `thread` as the service begins one (the lease taken, the question saved), not finished."""
    return run_begin(
        thread_id=thread.pk,
        user_id=thread.user_id,
        query=query,
        model_label="test",
        lease_seconds=lease_seconds,
        history_turns=0,
        deps_for=lambda agent_type, user_id: None,
    )


def finished_turn(
    thread: Thread,
    *,
    query: str = "Hello",
    answer: str = "Hi there.",
    status: str = Message.Status.COMPLETE,
    output: object = None,
    model_messages: list | None = None,
    metadata: dict | None = None,
) -> tuple[Message, Message]:
    """A finished exchange on a thread, saved as a run saves it: the user's message and the answer."""
    start = begin_run(thread, query)
    run_finish(
        message_id=start.assistant_message.pk,
        status=status,
        content=answer,
        output=output,
        metadata=metadata or {},
        model_messages=model_messages,
    )
    start.assistant_message.refresh_from_db()
    thread.refresh_from_db()
    return start.user_message, start.assistant_message


@pytest.fixture
def make_turn(db):
    return finished_turn


@pytest.fixture
def use_model(settings):
    """Answers from a FunctionModel of the test's function, set where every entry point resolves the model."""

    def use(function) -> FunctionModel:
        settings.AGENT_MODEL = FunctionModel(function)
        return settings.AGENT_MODEL

    return use


@dataclass(frozen=True)
class Caller:
    """An API key holder acting for an end user, as a live server's clients are."""

    key: str
    user_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key, "X-User-ID": str(self.user_id)}


@pytest.fixture
def caller(transactional_db) -> Caller:
    _, key = APIKey.objects.create_key(name="live")
    return Caller(key=key, user_id=uuid.uuid4())


def admin_rename(staff: Client, thread: Thread, title: str, *, meanwhile: Callable[[], object]) -> HttpResponse:
    """Rename the thread on its admin page, with `meanwhile` run after the admin read the thread, before it saves."""
    ran = []

    def run_meanwhile(sender: type, instance: Thread, **kwargs: object) -> None:
        if instance.pk == thread.pk and not ran:
            ran.append(meanwhile())

    pre_save.connect(run_meanwhile, sender=Thread)
    try:
        form = {"title": title, "metadata": "{}", "messages-TOTAL_FORMS": 0, "messages-INITIAL_FORMS": 0}
        return staff.post(f"/admin/threads/thread/{thread.pk}/change/", form)
    finally:
        pre_save.disconnect(run_meanwhile, sender=Thread)


def saves_then_drops_the_connection(monkeypatch) -> list[bool]:
    """Make the first save of an answer commit and then lose its connection, as a database that drops it right after
    the commit does; returns what each save attempt found (True: it saved the answer)."""
    monkeypatch.setattr(runs.lease, "SAVE_RETRY_DELAYS", (0,))
    real_finish = runs.lease.run_finish
    attempts: list[bool] = []

    def committed_then_the_connection_dropped(**kwargs: object) -> bool:
        attempts.append(saved := real_finish(**kwargs))
        if len(attempts) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return saved

    monkeypatch.setattr(runs.lease, "run_finish", committed_then_the_connection_dropped)
    return attempts


def pubsub_layer(url: str) -> RedisPubSubChannelLayer:
    """A Redis pub/sub channel layer of its own (its own connections), as one server process has."""
    return RedisPubSubChannelLayer(hosts=[{"address": url, **settings.REDIS_TIMEOUTS}])


async def close_hubs(*hubs: Hub) -> None:
    """Stop the hubs' background tasks and close their channel layers' connections."""
    for hub in hubs:
        for task in (hub.listener, hub._joining_cancels, hub._creating_inbox):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(hub.layer.flush(), 10)


@pytest.fixture
async def runs_end_with_the_test(settings, transactional_db):
    """A channel layer of this test's event loop, leases that do not lapse while the test holds a run, and every run
    started ended before the test's flush."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    settings.RUN_LEASE_SECONDS = settings.RUN_CHECKPOINT_SECONDS = 3600
    yield
    async with asyncio.timeout(20):
        while runs.runner._RUNS:
            await asyncio.sleep(0.01)


# --- threads and run tasks of the tests that run the application in their own event loop ---------------------------


@pytest.fixture
def support_thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


@pytest.fixture
def chat_thread(transactional_db, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="general_chat")


class RunTasks(set):
    """`runs.runner._RUNS`, remembering every run task it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[asyncio.Task] = []

    def add(self, task: asyncio.Task) -> None:
        self.started.append(task)
        super().add(task)


@pytest.fixture
async def checked_runs(settings, transactional_db, monkeypatch):
    """A channel layer of this test's own event loop; no run may outlive the test and write during the flush, and
    none may end in an error (every failure is the readers' `error` event, not the run task's exception). A run
    renews its lease and checkpoints its answer only in the tests about that (which set their own): elsewhere a
    renewal would be one more writer at a moment no test chose."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    settings.RUN_LEASE_SECONDS = settings.RUN_CHECKPOINT_SECONDS = 3600
    tasks = RunTasks()
    monkeypatch.setattr(runs.runner, "_RUNS", tasks)
    yield tasks
    # A run saves its answer, sends its last events and gives back its slot inside its task.
    if going := [run for run in tasks.started if not run.done()]:
        _, pending = await asyncio.wait(going, timeout=20)
        for run in pending:
            run.cancel()
        assert not pending, "a run was still going when its test ended"
    failed = [run.exception() for run in tasks.started if not run.cancelled() and run.exception() is not None]
    assert not failed, f"a run task ended in an error: {failed!r}"
