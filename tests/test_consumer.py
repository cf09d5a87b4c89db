"""The thread websocket, through the real ASGI application: routing, Origin checks, auth, frames and runs."""

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.cache.backends import base as cache_base
from django.core.cache.backends import locmem
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from agents.demo import respond
from agents.demo_script import POEM, STORY
from bankagent.asgi import application
from identity import authentication, tickets
from identity.models import APIKey, Profile
from identity.services import login_ensure
from runs import hub as hub_module
from runs import runner
from runs.hub import hub
from runs.limits import slots
from threads import consumers
from threads.consumers import ThreadConsumer
from threads.models import Message, Thread

# Runs write from other threads than the test's: only a transactional test database sees their rows. The demo
# customer comes from a data migration, which a transactional test's flush would delete for the tests after it.
pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 5  # seconds for any one frame; a whole run is bounded by RUN_TIMEOUT
RUN_TIMEOUT = 20
WRONG_KEY = "AbCdEfGh.ThisIsNotAKeyThisServerIssued0123456789"
BALANCE = "What is my balance?"
STREAM_ORDER = ["message_created", "message_started", "text_delta", "message_complete", "done"]
TOOL_ORDER = [
    "message_created",
    "message_started",
    "tool_call",
    "tool_result",
    "text_delta",
    "message_complete",
    "done",
]
CANCELLED_BEFORE_ANY_TOKEN = ["message_created", "message_started", "message_complete", "done"]


@dataclass
class Caller:
    """An API key holder acting for one end user."""

    key: str
    api_key: APIKey
    user_id: uuid.UUID

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-api-key", self.key.encode()), (b"x-user-id", str(self.user_id).encode())]


class Socket(WebsocketCommunicator):
    """A communicator that is disconnected once, whether by the test or by the fixture after it."""

    disconnected = False

    async def disconnect(self, code: int = 1000, timeout: float = TIMEOUT) -> None:
        if not self.disconnected:
            self.disconnected = True
            await super().disconnect(code, timeout)


class HeldModel:
    """The demo model, stopped before chunk `at` of its answer until the test lets it go on.

    Tool calls before the answer are streamed whole. The test learns that the model is held at that point
    (`reached`) and releases it (`resume`): which side of a race a run is on is then the test's choice.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()
        self.model = FunctionModel(self._request, stream_function=self._stream, model_name="held")

    async def _request(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=respond(messages, info))

    async def _stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        (part,) = respond(messages, info)
        if isinstance(part, TextPart):
            answer, pieces = True, list(chunks(part.content))
        else:
            answer = part.tool_name in {tool.name for tool in info.output_tools}
            pieces = [{0: DeltaToolCall(name=part.tool_name, tool_call_id=part.tool_call_id)}]
            pieces += [
                {0: DeltaToolCall(json_args=chunk)} for chunk in chunks(json.dumps(part.args, ensure_ascii=False))
            ]
        for index, piece in enumerate(pieces):
            if answer and index == self.at:
                self.reached.set()
                await self.resume.wait()
            yield piece

    async def held(self) -> None:
        """Wait until the model has streamed its first `at` chunks and waits for the test."""
        async with asyncio.timeout(TIMEOUT):
            await self.reached.wait()


def chunks(text: str) -> list[str]:
    """Word-sized chunks, as a model streams them."""
    words = text.split(" ")
    return [words[0], *(f" {word}" for word in words[1:])]


@pytest.fixture
def held_model(settings):
    """`held_model(at)` answers every run of the test (see HeldModel); each is let go when the test ends."""
    made: list[HeldModel] = []

    def make(at: int = 4) -> HeldModel:
        made.append(HeldModel(at))
        settings.AGENT_MODEL = made[-1].model
        return made[-1]

    yield make
    for model in made:
        model.resume.set()


async def no_run_left() -> bool:
    return (
        slots.taken == 0
        and not runner._RUNS
        and not await Message.objects.filter(status=Message.Status.IN_PROGRESS).aexists()
    )


@pytest.fixture(autouse=True)
async def channel_layer_of_this_test(settings, transactional_db):
    """A fresh channel layer bound to this test's event loop; no run may outlive the test."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    yield
    # A run holds its answer's lease until the answer is saved: wait for every run to end.
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            while not await no_run_left():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail("a run was still running when the test ended")
    finally:
        if (listener := hub().listener) is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


@pytest.fixture
def keys(transactional_db) -> dict[str, str]:
    _, valid = APIKey.objects.create_key(name="consumer tests")
    _, revoked = APIKey.objects.create_key(name="revoked", revoked=True)
    _, expired = APIKey.objects.create_key(name="expired", expiry_date=timezone.now() - timedelta(minutes=1))
    _, legacy = APIKey.objects.create_key(name="legacy client", events=APIKey.Events.LEGACY)
    return {"valid": valid, "revoked": revoked, "expired": expired, "legacy": legacy, "wrong": WRONG_KEY}


@pytest.fixture
def caller(keys, user_id) -> Caller:
    """The demo customer (John, who has an account) through a valid key."""
    return Caller(key=keys["valid"], api_key=APIKey.objects.get_from_key(keys["valid"]), user_id=user_id)


@pytest.fixture
def legacy_caller(keys, user_id) -> Caller:
    """The demo customer through a key of a client of the replaced service (the legacy event dialect)."""
    return Caller(key=keys["legacy"], api_key=APIKey.objects.get_from_key(keys["legacy"]), user_id=user_id)


@pytest.fixture
def new_thread(demo_customer, user_id):
    def make(*, user: uuid.UUID | None = None, agent_type: str = "bank_support") -> Thread:
        return Thread.objects.create(user_id=user or user_id, agent_type=agent_type)

    return make


@pytest.fixture
def thread(new_thread) -> Thread:
    return new_thread()


@pytest.fixture
def sibling_thread(new_thread) -> Thread:
    """Another thread of the same user."""
    return new_thread()


@pytest.fixture
def foreign_thread(new_thread, other_user_id) -> Thread:
    return new_thread(user=other_user_id)


@pytest.fixture
async def socket():
    """Open sockets with `socket(path, headers)`; every one is disconnected when the test ends."""
    opened: list[Socket] = []

    def make(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Socket:
        opened.append(Socket(application, path, headers=headers))
        return opened[-1]

    yield make
    for communicator in opened:
        # An application that failed or timed out has already failed the test: its disconnect only re-raises.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await communicator.disconnect()


def thread_path(thread_id: object, ticket: str | None = None) -> str:
    return f"/ws/v1/threads/{thread_id}/" + (f"?ticket={ticket}" if ticket else "")


async def connected(ws: Socket) -> None:
    """Connect and prove the socket is open and served: a ping is answered."""
    accepted, _ = await ws.connect(timeout=TIMEOUT)
    assert accepted
    await answers_ping(ws)


async def answers_ping(ws: Socket) -> None:
    """The socket is open, and nothing was sent to it before: a pong is the very next frame."""
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=TIMEOUT) == {"event": "pong"}


async def close_code(ws: Socket) -> int:
    """The close code of a socket refused after the handshake (a close code needs an accepted socket)."""
    accepted, _ = await ws.connect(timeout=TIMEOUT)
    assert accepted
    return await closed_with(ws)


async def refusal(ws: Socket) -> tuple[str, int]:
    """The error event's code and the close code of a socket refused after its handshake (a dependency down)."""
    accepted, _ = await ws.connect(timeout=TIMEOUT)  # raises if the consumer fails (a 500, or a 1011 close)
    assert accepted
    error = await ws.receive_json_from(timeout=TIMEOUT)
    assert error["event"] == "error", error
    return error["error_type"], await closed_with(ws)


async def closed_with(ws: Socket) -> int:
    message = await ws.receive_output(timeout=TIMEOUT)
    assert message["type"] == "websocket.close", message
    return message.get("code")


async def events_until_done(ws: Socket) -> list[dict]:
    events: list[dict] = []
    async with asyncio.timeout(RUN_TIMEOUT):
        while not events or events[-1]["event"] != "done":
            events.append(await ws.receive_json_from(timeout=TIMEOUT))
    return events


async def events_until(ws: Socket, name: str, count: int = 1) -> list[dict]:
    events: list[dict] = []
    while sum(event["event"] == name for event in events) < count:
        events.append(await ws.receive_json_from(timeout=TIMEOUT))
        assert events[-1]["event"] != "done", events
    return events


def shape(events: list[dict]) -> list[str]:
    """Event names, with a run of deltas counted once."""
    names: list[str] = []
    for event in events:
        if not (names and names[-1] == event["event"] and event["event"] in ("text_delta", "token")):
            names.append(event["event"])
    return names


async def call(method: str, path: str, caller: Caller, body: dict | None = None) -> tuple[int, dict, bytes]:
    """A request through the ASGI application, as a server would run it."""
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [
        (b"host", b"localhost"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *caller.headers(),
    ]
    http = HttpCommunicator(application, method, path, body=payload, headers=headers)
    # Read the response by hand: HttpCommunicator.get_response requires a `body` key that ASGI makes optional
    # (Django ends a streamed response with a body-less message).
    await http.send_input({"type": "http.request", "body": payload})
    start = await http.receive_output(timeout=TIMEOUT)
    assert start["type"] == "http.response.start", start
    chunks, more = [], True
    while more:
        message = await http.receive_output(timeout=RUN_TIMEOUT)
        assert message["type"] == "http.response.body", message
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    await http.wait(TIMEOUT)
    return start["status"], {name.lower(): value for name, value in start.get("headers", [])}, b"".join(chunks)


async def post(path: str, body: dict, caller: Caller) -> tuple[int, dict[bytes, bytes], bytes]:
    return await call("POST", path, caller, body)


async def issue_ticket(caller: Caller, thread: Thread) -> str:
    status, _, body = await post("/api/v1/ws-tickets", {"thread_id": str(thread.pk)}, caller)
    assert status == 201, body
    return json.loads(body)["ticket"]


async def nothing_written(thread: Thread) -> None:
    assert await Message.objects.filter(thread=thread).acount() == 0
    fresh = await Thread.objects.aget(pk=thread.pk)
    assert fresh.last_seq == 0


async def answer_of(thread: Thread) -> Message:
    return await Message.objects.aget(thread=thread, role=Message.Role.ASSISTANT)


async def answer_saved(thread: Thread) -> Message:
    """The thread's answer once its run has finished writing it."""
    finished = Message.objects.filter(thread=thread, role=Message.Role.ASSISTANT).exclude(
        status=Message.Status.IN_PROGRESS
    )
    async with asyncio.timeout(RUN_TIMEOUT):
        while (answer := await finished.afirst()) is None:
            await asyncio.sleep(0.05)
    return answer


# Header authentication


async def test_header_auth_connects(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.disconnect()


async def test_any_uuid_spelling_of_the_user_id_opens_the_users_thread(socket, caller, thread):
    headers = [(b"x-api-key", caller.key.encode()), (b"x-user-id", caller.user_id.hex.upper().encode())]
    ws = socket(thread_path(thread.pk), headers)
    await connected(ws)
    await ws.disconnect()


@pytest.mark.parametrize(
    ("key", "user"),
    [
        pytest.param(None, "user", id="no_key"),
        pytest.param("wrong", "user", id="wrong_key"),
        pytest.param("revoked", "user", id="revoked_key"),
        pytest.param("expired", "user", id="expired_key"),
        pytest.param("valid", None, id="no_user_id"),
        pytest.param("valid", "not-a-uuid", id="bad_user_id"),
        pytest.param(None, None, id="no_credentials"),
    ],
)
async def test_bad_credentials_close_with_4401(socket, keys, user_id, thread, key, user):
    headers = []
    if key:
        headers.append((b"x-api-key", keys[key].encode()))
    if user:
        headers.append((b"x-user-id", (str(user_id) if user == "user" else user).encode()))
    ws = socket(thread_path(thread.pk), headers)
    assert await close_code(ws) == 4401
    await ws.disconnect()


async def test_unknown_thread_closes_with_4404(socket, caller):
    ws = socket(thread_path(uuid.uuid4()), caller.headers())
    assert await close_code(ws) == 4404
    await ws.disconnect()


async def test_another_users_thread_closes_with_4404(socket, caller, foreign_thread):
    ws = socket(thread_path(foreign_thread.pk), caller.headers())
    assert await close_code(ws) == 4404
    await ws.disconnect()


async def test_non_uuid_thread_id_closes_with_4404(socket, caller):
    ws = socket(thread_path("not-a-uuid"), caller.headers())
    assert await close_code(ws) == 4404
    await ws.disconnect()


# Session (the chat page)


@sync_to_async
def signed_in_browser(username: str, user_id: uuid.UUID, *, active: bool = True) -> Client:
    """A browser signed in as the login `username`, which acts for `user_id`."""
    user, _ = login_ensure(username=username, password="unused in these tests", user_id=user_id)
    user.is_active = active
    user.save(update_fields=["is_active"])
    browser = Client()
    browser.force_login(user)
    return browser


def browser_headers(browser: Client) -> list[tuple[bytes, bytes]]:
    """The handshake headers of the browser's socket: its session cookie, and the Origin browsers send."""
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    return [(b"cookie", cookie.encode()), (b"origin", b"http://localhost")]


async def session_headers(username: str, user_id: uuid.UUID, *, active: bool = True) -> list[tuple[bytes, bytes]]:
    """A browser's handshake headers for a signed-in login acting for `user_id`."""
    return browser_headers(await signed_in_browser(username, user_id, active=active))


async def test_session_opens_the_users_thread_and_runs_a_query(socket, thread, user_id):
    ws = socket(thread_path(thread.pk), await session_headers("john", user_id))
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": BALANCE})
    assert shape(await events_until_done(ws)) == TOOL_ORDER
    assert (await answer_of(thread)).status == Message.Status.COMPLETE


async def test_session_on_another_users_thread_closes_with_4404(socket, foreign_thread, user_id):
    ws = socket(thread_path(foreign_thread.pk), await session_headers("john", user_id))
    assert await close_code(ws) == 4404


async def test_inactive_session_user_closes_with_4401(socket, thread, user_id):
    ws = socket(thread_path(thread.pk), await session_headers("john", user_id, active=False))
    assert await close_code(ws) == 4401


async def test_browser_without_session_or_ticket_closes_with_4401(socket, thread):
    ws = socket(thread_path(thread.pk), [(b"origin", b"http://localhost")])
    assert await close_code(ws) == 4401


# Tickets


async def test_ticket_endpoint_issues_a_ticket_for_ones_own_thread(caller, thread, settings, monkeypatch):
    issued_at = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: issued_at)
    status, headers, body = await post("/api/v1/ws-tickets", {"thread_id": str(thread.pk)}, caller)

    assert status == 201, body
    assert headers[b"content-type"].startswith(b"application/json")
    answer = json.loads(body)
    assert set(answer) == {"ticket", "expires_at"}
    assert isinstance(answer["ticket"], str) and len(answer["ticket"]) >= 20
    assert datetime.fromisoformat(answer["expires_at"]) == issued_at + timedelta(seconds=settings.WS_TICKET_SECONDS)


async def test_ticket_endpoint_answers_404_for_another_users_thread(caller, foreign_thread):
    status, _, body = await post("/api/v1/ws-tickets", {"thread_id": str(foreign_thread.pk)}, caller)

    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "not_found"


async def test_valid_ticket_connects_without_headers(socket, caller, thread):
    ticket = await issue_ticket(caller, thread)
    ws = socket(thread_path(thread.pk, ticket))
    await connected(ws)
    await ws.disconnect()


async def test_ticket_is_single_use(socket, caller, thread):
    ticket = await issue_ticket(caller, thread)
    first = socket(thread_path(thread.pk, ticket))
    await connected(first)
    await first.disconnect()

    second = socket(thread_path(thread.pk, ticket))
    assert await close_code(second) == 4401
    await second.disconnect()


async def test_ticket_request_while_redis_is_down_is_503_service_unavailable(caller, thread, redis_cache_down):
    redis_cache_down()

    status, headers, body = await post("/api/v1/ws-tickets", {"thread_id": str(thread.pk)}, caller)

    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "service_unavailable"
    assert headers[b"retry-after"] == b"5"


async def test_ticket_handshake_while_redis_is_down_gets_service_unavailable_then_1013(
    socket, caller, thread, redis_cache_down
):
    ticket = await issue_ticket(caller, thread)
    redis_cache_down()
    ws = socket(thread_path(thread.pk, ticket))

    assert await refusal(ws) == ("service_unavailable", 1013)
    await ws.disconnect()


async def test_unknown_ticket_closes_with_4401(socket, thread):
    ws = socket(thread_path(thread.pk, "not-a-ticket-this-server-issued"))
    assert await close_code(ws) == 4401
    await ws.disconnect()


class CacheClock:
    """The clock the in-memory cache expires its entries by, stopped, and moved on by the test."""

    def __init__(self) -> None:
        self.now = timezone.now().timestamp()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def ticket_clock(monkeypatch) -> CacheClock:
    """Tickets kept in an in-memory cache on a stopped clock (Redis would expire them by its own clock)."""
    clock = CacheClock()
    monkeypatch.setattr(cache_base, "time", clock)  # when an entry expires, computed as it is stored
    monkeypatch.setattr(locmem, "time", clock)  # whether it has, checked as it is read
    monkeypatch.setattr(tickets, "cache", locmem.LocMemCache("tickets-under-test", {}))
    return clock


async def test_ticket_expires_after_its_lifetime(socket, caller, thread, settings, ticket_clock):
    in_time, late = await issue_ticket(caller, thread), await issue_ticket(caller, thread)

    ticket_clock.advance(settings.WS_TICKET_SECONDS - 1)
    ws = socket(thread_path(thread.pk, in_time))
    await connected(ws)  # the same kind of ticket works within its lifetime
    await ws.disconnect()

    ticket_clock.advance(1)
    ws = socket(thread_path(thread.pk, late))
    assert await close_code(ws) == 4401
    await ws.disconnect()


async def test_ticket_for_one_thread_does_not_open_another(socket, caller, thread, sibling_thread):
    # The same user's thread: only the ticket's binding to its thread refuses it.
    ticket = await issue_ticket(caller, thread)
    ws = socket(thread_path(sibling_thread.pk, ticket))
    assert await close_code(ws) == 4401
    await ws.disconnect()


async def test_ticket_dies_with_its_revoked_api_key(socket, caller, thread):
    ticket = await issue_ticket(caller, thread)
    await APIKey.objects.filter(pk=caller.api_key.pk).aupdate(revoked=True)

    ws = socket(thread_path(thread.pk, ticket))
    assert await close_code(ws) == 4401
    await ws.disconnect()


# Credentials of an open socket: checked again before it acts, and before it is sent events


async def revoke(caller: Caller) -> None:
    await APIKey.objects.filter(pk=caller.api_key.pk).aupdate(revoked=True)


async def another_caller(user_id: uuid.UUID) -> Caller:
    """The same end user through the key of another client."""
    api_key, key = await sync_to_async(APIKey.objects.create_key)(name="another client")
    return Caller(key=key, api_key=api_key, user_id=user_id)


def signed_out(browser: Client, user: User) -> None:
    assert browser.post("/accounts/logout/").status_code == 302


def deactivated(browser: Client, user: User) -> None:
    user.is_active = False
    user.save(update_fields=["is_active"])


def password_changed(browser: Client, user: User) -> None:
    user.set_password("a new password")
    user.save(update_fields=["password"])


def acting_for_another_user(browser: Client, user: User) -> None:
    Profile.objects.filter(login=user).update(user_id=uuid.uuid4())


SIGN_IN_ENDINGS = {
    "signed_out": signed_out,
    "deactivated": deactivated,
    "password_changed": password_changed,
    "acting_for_another_user": acting_for_another_user,
}


@sync_to_async
def end_sign_in(browser: Client, ending: str = "signed_out") -> None:
    """End the browser's sign-in elsewhere than on its socket, as SIGN_IN_ENDINGS[ending] does."""
    SIGN_IN_ENDINGS[ending](browser, User.objects.get(pk=browser.session[SESSION_KEY]))


async def opened(kind: str, socket, thread: Thread, caller: Caller) -> tuple[Socket, Callable[[], Awaitable[None]]]:
    """A served socket on `thread` for the caller's end user, and what ends the credentials it was opened with.

    `key`: the caller's key in headers; `ticket`: a ticket of the caller's key; `another_key`: another client's key
    in headers; `session`: a browser signed in as john, who acts for the caller's end user.
    """
    if kind == "session":
        browser = await signed_in_browser("john", caller.user_id)
        ws, end = socket(thread_path(thread.pk), browser_headers(browser)), partial(end_sign_in, browser)
    else:
        holder = await another_caller(caller.user_id) if kind == "another_key" else caller
        if kind == "ticket":
            ws = socket(thread_path(thread.pk, await issue_ticket(holder, thread)))
        else:
            ws = socket(thread_path(thread.pk), holder.headers())
        end = partial(revoke, holder)
    await connected(ws)
    return ws, end


async def ends_for_its_credentials(ws: Socket) -> None:
    """The socket's next frame is an `authentication_failed` error, and then it closes with 4401."""
    error = await ws.receive_json_from(timeout=TIMEOUT)
    assert (error["event"], error["error_type"]) == ("error", "authentication_failed"), error
    assert await closed_with(ws) == 4401


def database_locked(credential: object) -> None:
    raise OperationalError("database is locked")


@pytest.mark.parametrize("ending", SIGN_IN_ENDINGS)
async def test_session_socket_whose_sign_in_ended_starts_no_run_and_closes_4401(
    socket, caller, thread, settings, ending
):
    settings.API_KEY_CACHE_SECONDS = 0  # as once the process's last look at the session has aged
    browser = await signed_in_browser("john", caller.user_id)
    ws = socket(thread_path(thread.pk), browser_headers(browser))
    await connected(ws)
    await end_sign_in(browser, ending)

    await ws.send_json_to({"type": "query", "query": BALANCE})

    await ends_for_its_credentials(ws)
    await ws.disconnect()
    await nothing_written(thread)


@pytest.mark.parametrize("kind", ["key", "ticket"])
@pytest.mark.parametrize("lapse", ["revoked", "expired"])
async def test_open_socket_whose_key_is_revoked_or_expired_starts_no_run_and_closes_4401(
    socket, caller, thread, settings, lapse, kind
):
    settings.API_KEY_CACHE_SECONDS = 0  # as once the process's memory of the key has lapsed
    ws, _ = await opened(kind, socket, thread, caller)
    change = {"revoked": True} if lapse == "revoked" else {"expiry_date": timezone.now() - timedelta(seconds=1)}
    await APIKey.objects.filter(pk=caller.api_key.pk).aupdate(**change)

    await ws.send_json_to({"type": "query", "query": BALANCE})

    await ends_for_its_credentials(ws)
    await ws.disconnect()
    await nothing_written(thread)


@pytest.mark.parametrize(
    ("watcher", "starter"),
    [("key", "another_key"), ("key", "session"), ("ticket", "another_key"), ("ticket", "session"), ("session", "key")],
)
async def test_socket_whose_credentials_end_mid_run_hears_no_more_of_it_and_closes_4401(
    socket, caller, thread, settings, held_model, watcher, starter
):
    settings.API_KEY_CACHE_SECONDS = 0
    model = held_model(at=0)  # the run waits after message_started
    watching, end_credentials = await opened(watcher, socket, thread, caller)
    running, _ = await opened(starter, socket, thread, caller)
    await running.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    await events_until(watching, "message_started")  # all there is so far

    await end_credentials()
    model.resume.set()

    await ends_for_its_credentials(watching)  # not one more event of the run
    events = await events_until_done(running)
    assert shape(events) == STREAM_ORDER
    assert events[-2]["status"] == "complete"


@pytest.mark.parametrize("watcher", ["key", "ticket", "session"])
async def test_cancel_from_a_socket_whose_credentials_ended_does_not_stop_the_run(
    socket, caller, thread, settings, held_model, watcher
):
    settings.API_KEY_CACHE_SECONDS = 0
    model = held_model(at=0)  # the run waits after message_started
    watching, end_credentials = await opened(watcher, socket, thread, caller)
    running, _ = await opened("key" if watcher == "session" else "another_key", socket, thread, caller)
    await running.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    await events_until(watching, "message_started")  # all there is so far
    await end_credentials()

    await watching.send_json_to({"type": "cancel"})
    await ends_for_its_credentials(watching)
    model.resume.set()

    events = await events_until_done(running)
    assert events[-2]["status"] == "complete"
    assert (await answer_of(thread)).status == Message.Status.COMPLETE


@pytest.mark.parametrize("watcher", ["key", "ticket"])
async def test_socket_whose_key_expires_mid_run_stops_at_once(socket, caller, thread, held_model, monkeypatch, watcher):
    # API_KEY_CACHE_SECONDS keeps its default: an expiry needs no second look at the key to apply.
    expiry = timezone.now() + timedelta(hours=1)
    await APIKey.objects.filter(pk=caller.api_key.pk).aupdate(expiry_date=expiry)
    model = held_model(at=0)  # the run waits after message_started
    watching, _ = await opened(watcher, socket, thread, caller)
    running, _ = await opened("another_key", socket, thread, caller)
    await running.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    await events_until(watching, "message_started")  # all there is so far

    # Only the clock the credentials are checked by: the runs' leases keep the real one.
    monkeypatch.setattr(authentication, "timezone", SimpleNamespace(now=lambda: expiry))
    model.resume.set()

    await ends_for_its_credentials(watching)
    assert (await events_until_done(running))[-2]["status"] == "complete"


@pytest.mark.parametrize("kind", ["key", "ticket", "session"])
async def test_ping_on_a_socket_whose_credentials_ended_gets_authentication_failed_instead_of_pong(
    socket, caller, thread, settings, kind
):
    settings.API_KEY_CACHE_SECONDS = 0
    ws, end_credentials = await opened(kind, socket, thread, caller)
    await end_credentials()

    await ws.send_json_to({"type": "ping"})

    await ends_for_its_credentials(ws)


async def test_events_waiting_behind_a_send_under_way_are_dropped_when_the_key_is_revoked(
    socket, caller, thread, settings, held_model, monkeypatch
):
    model = held_model(at=4)
    watching, _ = await opened("key", socket, thread, caller)
    running, _ = await opened("another_key", socket, thread, caller)
    stalled, reading_again = asyncio.Event(), asyncio.Event()
    send = ThreadConsumer.send

    async def watcher_stops_reading(consumer, text_data=None, bytes_data=None, close=False) -> None:
        if (b"x-api-key", caller.key.encode()) in consumer.scope["headers"] and not reading_again.is_set():
            stalled.set()
            await reading_again.wait()
        await send(consumer, text_data, bytes_data, close)

    monkeypatch.setattr(ThreadConsumer, "send", watcher_stops_reading)
    await running.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    async with asyncio.timeout(TIMEOUT):
        await stalled.wait()  # the watcher's writer is sending the run's first event
    seen = await events_until(running, "text_delta")  # and the run's next events wait behind it

    await revoke(caller)
    settings.API_KEY_CACHE_SECONDS = 0
    await watching.send_json_to({"type": "cancel"})
    reading_again.set()

    assert (await watching.receive_json_from(timeout=TIMEOUT))["event"] == "message_created"
    await ends_for_its_credentials(watching)
    model.resume.set()
    seen += await events_until_done(running)
    assert shape(seen) == STREAM_ORDER
    assert (await answer_of(thread)).status == Message.Status.COMPLETE


@pytest.mark.parametrize("frame", ["query", "cancel"])
@pytest.mark.parametrize("kind", ["key", "session"])
async def test_frame_whose_credentials_cannot_be_checked_gets_database_busy_and_the_socket_stays_open(
    socket, caller, thread, settings, monkeypatch, kind, frame
):
    settings.API_KEY_CACHE_SECONDS = 0
    ws, _ = await opened(kind, socket, thread, caller)
    credential = authentication.SessionCredential if kind == "session" else authentication.KeyCredential

    with monkeypatch.context() as database:
        database.setattr(credential, "look_up", database_locked)
        await ws.send_json_to({"type": frame, "query": BALANCE, "request_id": "while-locked"})
        error = await ws.receive_json_from(timeout=TIMEOUT)
        await answers_ping(ws)  # a check the database cannot make is no revocation: events still go out

    assert (error["event"], error["error_type"], error["request_id"]) == ("error", "database_busy", "while-locked")
    await nothing_written(thread)
    await ws.send_json_to({"type": "query", "query": BALANCE})
    assert shape(await events_until_done(ws)) == TOOL_ORDER


async def test_events_keep_reaching_a_socket_whose_credentials_cannot_be_checked(
    socket, caller, thread, settings, monkeypatch
):
    settings.API_KEY_CACHE_SECONDS = 0
    watching, _ = await opened("key", socket, thread, caller)
    running, _ = await opened("session", socket, thread, caller)
    monkeypatch.setattr(authentication.KeyCredential, "look_up", database_locked)

    await running.send_json_to({"type": "query", "query": BALANCE})

    assert shape(await events_until_done(watching)) == TOOL_ORDER
    assert shape(await events_until_done(running)) == TOOL_ORDER


async def test_session_signed_under_a_previous_secret_keeps_its_socket(socket, caller, thread, settings):
    settings.API_KEY_CACHE_SECONDS = 0
    ws, _ = await opened("session", socket, thread, caller)
    settings.SECRET_KEY_FALLBACKS, settings.SECRET_KEY = [settings.SECRET_KEY], "a-rotated-secret-key-for-this-test"

    await ws.send_json_to({"type": "query", "query": BALANCE})

    assert shape(await events_until_done(ws)) == TOOL_ORDER


# Origin and routing


@pytest.mark.parametrize("origin", ["http://localhost", "http://127.0.0.1:8000"])
async def test_allowed_origin_connects(socket, caller, thread, origin):
    ticket = await issue_ticket(caller, thread)  # a browser: Origin and a ticket, no headers of its own
    ws = socket(thread_path(thread.pk, ticket), [(b"origin", origin.encode())])
    await connected(ws)
    await ws.disconnect()


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example", "null"])
async def test_foreign_origin_is_refused_at_the_handshake(socket, caller, thread, origin):
    ws = socket(thread_path(thread.pk), [(b"origin", origin.encode()), *caller.headers()])
    accepted, _ = await ws.connect(timeout=TIMEOUT)
    assert accepted is False
    await ws.disconnect()


async def test_no_origin_connects_with_headers(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    assert not any(name == b"origin" for name, _ in ws.scope["headers"])
    await connected(ws)
    await ws.disconnect()


@pytest.mark.parametrize("path", ["/ws/v1/nope/", "/ws/v1/threads/", "/ws/v2/threads/{id}/", "/api/v1/threads"])
async def test_unknown_websocket_path_is_refused_at_the_handshake(socket, caller, thread, path):
    ws = socket(path.format(id=thread.pk), caller.headers())
    accepted, _ = await ws.connect(timeout=TIMEOUT)  # raises if the router fails instead of refusing
    assert accepted is False
    await ws.disconnect()


# Frames


async def test_ping_gets_pong(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    assert (await ws.connect(timeout=TIMEOUT))[0]
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=TIMEOUT) == {"event": "pong"}
    await ws.disconnect()


async def test_query_streams_contract_events_in_order(socket, caller, thread, held_model):
    model = held_model(at=4)  # held after `{"support_advice": "John, your`
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "query", "query": BALANCE, "request_id": "req-42"})
    await model.held()
    events = await events_until(ws, "text_delta")
    model.resume.set()
    events += await events_until_done(ws)
    await ws.disconnect()

    assert shape(events) == TOOL_ORDER
    assert all(event.get("request_id") == "req-42" for event in events)
    question, answer = [m async for m in Message.objects.filter(thread=thread).order_by("seq")]
    assert events[0]["message"] == {"id": str(question.id), "role": "user", "content": BALANCE}
    assert {event["message_id"] for event in events[1:-1]} == {str(answer.id)}
    tool_call, tool_result = events[2], events[3]
    assert tool_call["tool_call"] == {"name": "customer_balance", "args": {"include_pending": False}}
    assert tool_result["tool_result"]["name"] == "customer_balance"
    assert "1123.45" in json.dumps(tool_result["tool_result"])  # John's balance, read by the real tool
    tokens = [json.loads(event["token"]) for event in events if event["event"] == "text_delta"]
    assert len(tokens) > 1
    # Only the fields the model has produced so far: no default stands in for block_card.
    assert set(tokens[0]) == {"support_advice"} and "John, your".startswith(tokens[0]["support_advice"])
    assert tokens[-1] == answer.output
    assert answer.status == Message.Status.COMPLETE
    assert answer.output["support_advice"] == "John, your current balance is $1,123.45."
    complete = events[-2]
    assert complete["status"] == "complete" and complete["output"] == answer.output
    assert complete["content"] == answer.content


BAD_FRAMES = [
    pytest.param({"bytes_data": b'{"type": "ping"}'}, id="binary"),
    pytest.param({"text_data": "What is my balance?"}, id="not_json"),
    pytest.param({"text_data": '["query", "What is my balance?"]'}, id="not_an_object"),
    pytest.param({"text_data": '{"query": "What is my balance?"}'}, id="no_type"),
    pytest.param({"text_data": '{"type": "delete_thread"}'}, id="unknown_type"),
    pytest.param({"text_data": '{"type": "query", "query": "What is my balance?", "n": NaN}'}, id="nan"),
]


@pytest.mark.parametrize("frame", BAD_FRAMES)
async def test_bad_frame_gets_bad_frame_error_and_socket_stays_open(socket, caller, thread, frame):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_to(**frame)
    error = await ws.receive_json_from(timeout=TIMEOUT)
    await ws.send_json_to({"type": "ping"})
    after = await ws.receive_json_from(timeout=TIMEOUT)
    await ws.disconnect()

    assert error["event"] == "error" and error["error_type"] == "bad_frame", error
    assert isinstance(error["error"], str) and error["error"]
    assert after == {"event": "pong"}
    await nothing_written(thread)


def frame_of_size(size: int) -> str:
    head, tail = '{"type": "query", "query": "', '"}'
    return head + "a" * (size - len(head) - len(tail)) + tail


INVALID_QUERIES = [
    pytest.param(json.dumps({"type": "query", "query": ""}), "validation_error", id="empty"),
    pytest.param(json.dumps({"type": "query", "query": "   \n\t "}), "validation_error", id="blank"),
    pytest.param(json.dumps({"type": "query"}), "validation_error", id="missing"),
    pytest.param(json.dumps({"type": "query", "query": 12}), "validation_error", id="not_a_string"),
    pytest.param(json.dumps({"type": "query", "query": "a" * 8_001}), "query_too_long", id="8001_chars"),
    pytest.param(json.dumps({"type": "query", "query": "my\x00balance"}), "invalid_text", id="nul"),
    pytest.param(json.dumps({"type": "query", "query": "my \ud800 balance"}), "invalid_text", id="lone_surrogate"),
    # 65,536 bytes are read (and then refused for their length); one byte more is not read at all.
    pytest.param(frame_of_size(65_536), "query_too_long", id="frame_of_65536_bytes"),
    pytest.param(frame_of_size(65_537), "payload_too_large", id="frame_of_65537_bytes"),
]


@pytest.mark.parametrize(("text", "code"), INVALID_QUERIES)
async def test_invalid_query_gets_the_http_error_code(socket, caller, thread, text, code):
    assert len(text.encode("utf-8", "surrogatepass")) <= 65_537
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_to(text_data=text)
    error = await ws.receive_json_from(timeout=TIMEOUT)
    await ws.send_json_to({"type": "ping"})
    after = await ws.receive_json_from(timeout=TIMEOUT)
    await ws.disconnect()

    assert error["event"] == "error" and error["error_type"] == code, error
    assert after == {"event": "pong"}
    await nothing_written(thread)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(65_537, id="64_KiB_and_a_byte"),
        pytest.param(921_600, id="900_KiB"),
        pytest.param(1_048_576, id="1_MiB"),
    ],
)
async def test_frame_above_64_kib_gets_payload_too_large_and_the_socket_stays_open(socket, caller, thread, size):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_to(text_data=frame_of_size(size))
    error = await ws.receive_json_from(timeout=TIMEOUT)
    await answers_ping(ws)
    await ws.disconnect()

    assert error["event"] == "error" and error["error_type"] == "payload_too_large", error
    await nothing_written(thread)


async def test_frame_above_1_mib_closes_with_1009(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_to(text_data=frame_of_size(1_048_577))

    assert await closed_with(ws) == 1009
    await ws.disconnect()
    await nothing_written(thread)


async def test_channel_layer_down_at_the_handshake_closes_with_1013_after_service_unavailable(
    socket, caller, thread, monkeypatch
):
    async def down(group: str, channel: str) -> None:
        raise ConnectionError("the channel layer is down")

    monkeypatch.setattr(get_channel_layer(), "group_add", down)
    ws = socket(thread_path(thread.pk), caller.headers())

    assert await refusal(ws) == ("service_unavailable", 1013)
    await ws.disconnect()


async def test_channel_layer_that_never_answers_at_the_handshake_closes_with_1013_after_service_unavailable(
    socket, caller, thread, monkeypatch
):
    async def never_answers(group: str, channel: str) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(get_channel_layer(), "group_add", never_answers)
    monkeypatch.setattr(hub_module, "LAYER_TIMEOUT_SECONDS", 0.01)
    ws = socket(thread_path(thread.pk), caller.headers())

    assert await refusal(ws) == ("service_unavailable", 1013)
    await ws.disconnect()


async def test_database_failing_at_the_handshake_gets_database_busy_then_1013(socket, caller, thread, monkeypatch):
    def locked(**kwargs: object) -> Thread:
        raise OperationalError("database is locked")

    monkeypatch.setattr(consumers, "thread_get_for_user", locked)
    ws = socket(thread_path(thread.pk), caller.headers())

    assert await refusal(ws) == ("database_busy", 1013)
    await ws.disconnect()


# Runs


async def test_second_query_while_running_gets_thread_busy(socket, caller, thread, held_model):
    model = held_model(at=4)
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    await ws.send_json_to({"type": "query", "query": BALANCE})
    events = await events_until(ws, "error")
    model.resume.set()
    events += await events_until_done(ws)
    await ws.disconnect()

    errors = [event for event in events if event["event"] == "error"]
    assert [error["error_type"] for error in errors] == ["thread_busy"]
    assert shape([event for event in events if event["event"] != "error"]) == STREAM_ORDER
    messages = [m async for m in Message.objects.filter(thread=thread).order_by("seq")]
    assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert messages[1].output["support_advice"] == POEM


async def test_cancel_stops_the_run_and_saves_the_partial_answer(socket, caller, thread, held_model):
    model = held_model(at=6)
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "query", "query": "Tell me a story"})
    await model.held()  # the model is mid-answer, and stays there
    events = await events_until(ws, "text_delta")
    await ws.send_json_to({"type": "cancel"})
    events += await events_until_done(ws)

    assert shape(events) == STREAM_ORDER
    answer = await answer_of(thread)
    assert answer.status == Message.Status.INCOMPLETE
    assert json.loads(answer.content) == answer.output
    partial = answer.output["support_advice"]
    assert partial and STORY.startswith(partial) and len(partial) < len(STORY)
    # What the socket saw last is what was saved.
    assert json.loads([event for event in events if event["event"] == "text_delta"][-1]["token"]) == answer.output
    complete = events[-2]
    assert (complete["status"], complete["content"], complete["output"]) == (
        "incomplete",
        answer.content,
        answer.output,
    )
    # The thread is free again at once.
    model.resume.set()
    await ws.send_json_to({"type": "query", "query": BALANCE})
    assert shape(await events_until_done(ws)) == TOOL_ORDER
    await ws.disconnect()


async def test_a_refused_second_query_does_not_stop_the_run_from_being_cancelled(socket, caller, thread, held_model):
    model = held_model(at=6)
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": "Tell me a story"})
    await model.held()

    await ws.send_json_to({"type": "query", "query": "And another one"})
    events = await events_until(ws, "error")
    assert events[-1]["error_type"] == "thread_busy"
    await ws.send_json_to({"type": "cancel"})
    events += await events_until_done(ws)  # the model is still held: only the cancel ends the run

    assert shape([event for event in events if event["event"] != "error"]) == STREAM_ORDER
    assert (await answer_of(thread)).status == Message.Status.INCOMPLETE
    await ws.disconnect()


async def test_cancel_sent_right_after_the_query_stops_that_run(socket, caller, thread, held_model):
    held_model(at=0)  # the model never answers by itself: only the cancel can end the run
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "query", "query": "Tell me a story"})
    await ws.send_json_to({"type": "cancel"})
    events = await events_until_done(ws)
    await answers_ping(ws)
    await ws.disconnect()

    assert shape(events) == CANCELLED_BEFORE_ANY_TOKEN
    answer = await answer_of(thread)
    assert answer.status == Message.Status.INCOMPLETE
    assert (events[-2]["message_id"], events[-2]["status"]) == (str(answer.id), "incomplete")


async def test_cancel_right_after_the_next_query_stops_the_next_run(socket, caller, thread, held_model, settings):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": BALANCE})
    assert shape(await events_until_done(ws)) == TOOL_ORDER

    held_model(at=0)
    await ws.send_json_to({"type": "query", "query": "Tell me a story"})
    await ws.send_json_to({"type": "cancel"})
    events = await events_until_done(ws)
    await ws.disconnect()

    assert shape(events) == CANCELLED_BEFORE_ANY_TOKEN
    messages = [m async for m in Message.objects.filter(thread=thread, role=Message.Role.ASSISTANT).order_by("seq")]
    assert [m.status for m in messages] == [Message.Status.COMPLETE, Message.Status.INCOMPLETE]
    assert events[-2]["message_id"] == str(messages[1].id)


async def test_cancel_from_another_socket_on_the_thread_stops_the_run(socket, caller, thread, held_model):
    model = held_model(at=6)
    starter, canceller = (
        socket(thread_path(thread.pk), caller.headers()),
        socket(thread_path(thread.pk), caller.headers()),
    )
    for ws in (starter, canceller):
        await connected(ws)

    await starter.send_json_to({"type": "query", "query": "Tell me a story"})
    await model.held()
    await canceller.send_json_to({"type": "cancel"})
    seen_by_starter, seen_by_canceller = await events_until_done(starter), await events_until_done(canceller)
    for ws in (starter, canceller):
        await ws.disconnect()

    assert shape(seen_by_starter) == STREAM_ORDER
    assert seen_by_canceller == seen_by_starter
    assert seen_by_starter[-2]["status"] == "incomplete"
    assert (await answer_of(thread)).status == Message.Status.INCOMPLETE


async def test_cancel_with_nothing_running_does_nothing(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "cancel"})
    await answers_ping(ws)  # nothing came back for the cancel
    await nothing_written(thread)
    # Nor is the cancel kept for the next run.
    await ws.send_json_to({"type": "query", "query": BALANCE})
    events = await events_until_done(ws)
    await ws.disconnect()

    assert shape(events) == TOOL_ORDER
    assert (await answer_of(thread)).status == Message.Status.COMPLETE


async def test_every_socket_on_the_thread_receives_the_same_events(socket, caller, thread, sibling_thread):
    first, second = socket(thread_path(thread.pk), caller.headers()), socket(thread_path(thread.pk), caller.headers())
    elsewhere = socket(thread_path(sibling_thread.pk), caller.headers())
    for ws in (first, second, elsewhere):
        await connected(ws)

    await first.send_json_to({"type": "query", "query": BALANCE, "request_id": "from-first"})
    sent_to_first, sent_to_second = await events_until_done(first), await events_until_done(second)

    assert shape(sent_to_first) == TOOL_ORDER
    assert sent_to_second == sent_to_first
    await answers_ping(elsewhere)  # a socket on another thread was sent none of it
    for ws in (first, second, elsewhere):
        await ws.disconnect()


async def test_socket_leaving_mid_run_does_not_lose_the_answer(socket, caller, thread, held_model):
    model = held_model(at=4)
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()
    await events_until(ws, "text_delta")
    await ws.disconnect()
    model.resume.set()

    answer = await answer_saved(thread)
    assert answer.status == Message.Status.COMPLETE
    assert answer.output["support_advice"] == POEM
    assert json.loads(answer.content) == answer.output


class StalledClient:
    """A client that stops reading: from `stall()` on, sends to its socket wait until it reads again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stalled, self.reading_again = asyncio.Event(), asyncio.Event()
        send = ThreadConsumer.send

        async def send_to_the_client(consumer, text_data=None, bytes_data=None, close=False) -> None:
            if self.stalled.is_set():
                await self.reading_again.wait()
            await send(consumer, text_data, bytes_data, close)

        monkeypatch.setattr(ThreadConsumer, "send", send_to_the_client)


@pytest.fixture
def stalled_client(settings, monkeypatch) -> StalledClient:
    settings.STREAM_BACKLOG_EVENTS = 2  # a balance answer is seven events
    client = StalledClient(monkeypatch)
    yield client
    client.reading_again.set()


async def test_socket_that_stops_reading_is_dropped_while_the_run_saves_its_answer(
    socket, caller, thread, stalled_client
):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    stalled_client.stalled.set()

    await ws.send_json_to({"type": "query", "query": BALANCE})
    answer = await answer_saved(thread)
    assert answer.status == Message.Status.COMPLETE
    assert answer.output["support_advice"] == "John, your current balance is $1,123.45."
    # Seven events, and room for two: the socket is closed while its client still reads nothing.
    assert await closed_with(ws) == 1013
    await ws.disconnect()


async def test_socket_that_stops_reading_does_not_hold_up_the_run_and_never_gets_the_rest(
    socket, caller, thread, stalled_client
):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    stalled_client.stalled.set()

    await ws.send_json_to({"type": "query", "query": BALANCE})
    answer = await answer_saved(thread)
    assert answer.status == Message.Status.COMPLETE
    assert answer.output["support_advice"] == "John, your current balance is $1,123.45."

    stalled_client.reading_again.set()
    received = []
    while (message := await ws.receive_output(timeout=TIMEOUT))["type"] == "websocket.send":
        received.append(json.loads(message["text"])["event"])
    assert message == {"type": "websocket.close", "code": 1013}
    assert "done" not in received and len(received) < len(TOOL_ORDER)
    await ws.disconnect()


async def test_socket_whose_sending_fails_is_closed_rather_than_left_silent(socket, caller, thread, monkeypatch):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    async def send_fails(self, text_data: str | None = None, **kwargs: object) -> None:
        raise RuntimeError("the transport broke")

    monkeypatch.setattr(ThreadConsumer, "send", send_fails)
    await ws.send_json_to({"type": "ping"})

    assert await closed_with(ws) == 1011
    await ws.disconnect()


async def test_throttled_query_gets_throttled_error_and_the_socket_stays_open(socket, caller, thread, settings):
    settings.THROTTLE_RATES = {"runs_user": "1/min"}
    await cache.aclear()
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": BALANCE})
    assert shape(await events_until_done(ws)) == TOOL_ORDER

    await ws.send_json_to({"type": "query", "query": BALANCE, "request_id": "one-too-many"})
    error = await ws.receive_json_from(timeout=TIMEOUT)
    await answers_ping(ws)
    await ws.disconnect()

    assert error["event"] == "error" and error["error_type"] == "throttled", error
    assert error["request_id"] == "one-too-many"
    assert await Message.objects.filter(thread=thread).acount() == 2


async def test_query_past_run_concurrency_gets_overloaded_and_writes_nothing(
    socket, caller, thread, sibling_thread, settings, held_model
):
    settings.RUN_CONCURRENCY = 1
    model = held_model(at=4)
    busy, refused = (
        socket(thread_path(sibling_thread.pk), caller.headers()),
        socket(thread_path(thread.pk), caller.headers()),
    )
    for ws in (busy, refused):
        await connected(ws)
    await busy.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()  # the process's only run slot is taken

    await refused.send_json_to({"type": "query", "query": BALANCE})
    error = await refused.receive_json_from(timeout=TIMEOUT)
    await answers_ping(refused)
    model.resume.set()
    assert shape(await events_until_done(busy)) == STREAM_ORDER
    for ws in (busy, refused):
        await ws.disconnect()

    assert error["event"] == "error" and error["error_type"] == "overloaded", error
    await nothing_written(thread)


async def test_run_started_over_http_streams_to_the_threads_sockets(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    status, headers, body = await post("/api/v1/agent/stream", {"thread_id": str(thread.pk), "query": BALANCE}, caller)
    over_http = [json.loads(line) for line in body.decode().splitlines()]
    over_socket = await events_until_done(ws)
    await ws.disconnect()

    assert status == 200, body
    assert headers[b"content-type"].startswith(b"application/x-ndjson")
    assert shape(over_http) == TOOL_ORDER
    assert shape(over_socket) == shape(over_http)
    assert over_socket[-2] == over_http[-2]


async def test_blocking_query_over_http_is_seen_by_the_threads_sockets(socket, caller, thread):
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)

    status, _, body = await post("/api/v1/agent/query", {"thread_id": str(thread.pk), "query": BALANCE}, caller)
    events = await events_until_done(ws)
    await ws.disconnect()

    assert status == 200, body
    assert [event["event"] for event in events] == CANCELLED_BEFORE_ANY_TOKEN  # a blocking run streams no tokens
    question, answer = [m async for m in Message.objects.filter(thread=thread).order_by("seq")]
    assert events[0]["message"]["id"] == str(question.id)
    complete = events[2]
    answered = json.loads(body)
    assert complete["message_id"] == str(answer.id) == answered["message_id"]
    assert complete["status"] == "complete" == answered["status"]
    assert complete["output"] == answer.output == answered["output"]
    assert complete["content"] == answer.content == answered["response"]
    assert answer.output["support_advice"] == "John, your current balance is $1,123.45."


async def test_thread_deleted_mid_run_ends_with_not_found_and_the_socket_stays_usable(
    socket, caller, thread, held_model
):
    model = held_model(at=4)
    ws = socket(thread_path(thread.pk), caller.headers())
    await connected(ws)
    await ws.send_json_to({"type": "query", "query": "Write me a poem"})
    await model.held()

    status, _, body = await call("DELETE", f"/api/v1/threads/{thread.pk}", caller)
    assert status == 204, body
    model.resume.set()
    events = await events_until_done(ws)
    await answers_ping(ws)
    await ws.disconnect()

    assert [event["event"] for event in events[-2:]] == ["error", "done"]
    assert events[-2]["error_type"] == "not_found"
    assert "message_complete" not in {event["event"] for event in events}
    assert not await Thread.objects.filter(pk=thread.pk).aexists()
    assert not await Message.objects.filter(thread_id=thread.pk).aexists()


@pytest.mark.parametrize("by", ["headers", "ticket"])
async def test_legacy_key_gets_token_events_and_no_tool_events(socket, legacy_caller, thread, by):
    if by == "ticket":
        ws = socket(thread_path(thread.pk, await issue_ticket(legacy_caller, thread)))
    else:
        ws = socket(thread_path(thread.pk), legacy_caller.headers())
    await connected(ws)

    await ws.send_json_to({"type": "query", "query": BALANCE})
    events = await events_until_done(ws)
    await ws.disconnect()

    assert shape(events) == ["message_created", "message_started", "token", "message_complete", "done"]
    answer = await answer_of(thread)
    assert json.loads([event for event in events if event["event"] == "token"][-1]["token"]) == answer.output
    assert answer.status == Message.Status.COMPLETE
