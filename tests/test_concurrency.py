"""One run per thread, where it can fail: real concurrent requests to live server processes on PostgreSQL.

Blocking queries, NDJSON streams and websocket queries are fired at one thread at once, through one server process
and through two (sharing PostgreSQL and Redis), while the model holds the winner's answer open; lapsed leases are
taken over by many callers at once; cancels race run starts, renewals race the sweep and takeovers, an admin edit
races a run. After each, the database is checked: no two runs held a thread, `seq` runs 1, 2, 3 … without a gap,
and every answer's model saw every exchange finished before it.
"""

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, connections
from django.test import Client
from django.utils import timezone
from websockets.sync.client import connect

from bank.models import Card
from bankagent.exceptions import ThreadBusy
from runs.services import INTERRUPTED, runs_interrupt, runs_renew
from tests.conftest import Caller, admin_rename, begin_run
from tests.live import TIMEOUT, LiveServer, ModelCall, ModelServer, request, server_env, shape
from threads.models import Approval, Message, Thread

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: SQLite serialises every writer, so nothing here could race",
    ),
]

ANSWER = ["Noted", "."]
BURST = 9
"""Requests fired at once: blocking queries, NDJSON streams and websocket queries, a third each."""
ROUNDS = 4
RACES = 30
"""Rounds of a race between two database writers."""


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    server = ModelServer(ANSWER).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_model(request) -> Iterator[None]:
    if "model" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("model")
    yield
    model.release()
    with model.changed:
        model.calls.clear()


def start_servers(count: int, folder, model: ModelServer) -> list[LiveServer]:
    overrides = model.env()
    if count > 1:
        if not settings.REDIS_URL:
            pytest.skip("two processes share their runs' events and cancels through Redis: needs REDIS_URL")
        overrides["REDIS_URL"] = settings.REDIS_URL
    servers = [LiveServer("granian", server_env(**overrides), folder / f"server-{n}.log") for n in range(count)]
    for server in servers:
        server.start(healthy=True)
    return servers


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "two processes"])
def servers(request, django_db_setup, tmp_path_factory, model) -> Iterator[list[LiveServer]]:
    started = start_servers(request.param, tmp_path_factory.mktemp("servers"), model)
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def thread(caller) -> Thread:
    return Thread.objects.create(user_id=caller.user_id, agent_type="general_chat")


# --- asking --------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one request ended: its status (a socket's as HTTP's would be) and its body or events."""

    kind: str
    query: str
    status: int = 0
    body: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return self.body.get("error", {}).get("code")


def ask(server: LiveServer, caller: Caller, thread: Thread, kind: str, query: str, go: threading.Barrier) -> Outcome:
    """One query of `kind` (query, stream or socket), sent when every request of the burst is ready to go."""
    if kind == "socket":
        return ask_on_socket(server, caller, thread, query, go)
    outcome = Outcome(kind, query)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3 * TIMEOUT)
    conn.connect()
    go.wait(TIMEOUT)
    body = json.dumps({"thread_id": str(thread.pk), "query": query})
    path = "/api/v1/agent/stream" if kind == "stream" else "/api/v1/agent/query"
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **caller.headers})
    response = conn.getresponse()
    outcome.status = response.status
    if kind == "stream" and response.status == 200:
        outcome.events = [json.loads(line) for line in response]
    else:
        outcome.body = json.loads(response.read())
    conn.close()
    return outcome


def ask_on_socket(server: LiveServer, caller: Caller, thread: Thread, query: str, go: threading.Barrier) -> Outcome:
    """A websocket query: 200 once its own run is done, or the status of the error its frame got."""
    outcome = Outcome("socket", query)
    with connect(server.ws_url(thread), additional_headers=caller.headers, proxy=None) as ws:
        go.wait(TIMEOUT)
        ws.send(json.dumps({"type": "query", "query": query, "request_id": query}))
        while True:
            event = json.loads(ws.recv(timeout=3 * TIMEOUT))
            if event.get("request_id") != query:
                continue  # another run's event: every socket on the thread gets them
            outcome.events.append(event)
            if event["event"] == "error" and len(outcome.events) == 1:
                outcome.status, outcome.body = (
                    409 if event["error_type"] == "thread_busy" else 500,
                    {"error": {"code": event["error_type"]}},
                )
                return outcome
            if event["event"] == "done":
                outcome.status = 200
                return outcome


def burst(servers: list[LiveServer], model: ModelServer, caller: Caller, thread: Thread, label: str) -> list[Outcome]:
    """BURST queries at once, spread over the servers, while the model holds whichever run starts: every request
    but the winner's is answered before the winner's model is let go."""
    kinds = ["query", "stream", "socket"]
    model.hold()
    called_before = len(model.calls)
    go = threading.Barrier(BURST)
    with ThreadPoolExecutor(BURST) as pool:
        futures: list[Future[Outcome]] = []
        for n in range(BURST):
            server, kind = servers[n % len(servers)], kinds[n % len(kinds)]
            futures.append(pool.submit(ask, server, caller, thread, kind, f"{label}-{kind}-{n}", go))
            futures[-1].add_done_callback(lambda _: model.poke())

        def settled(calls: list[ModelCall]) -> bool:
            return len(calls) - called_before + sum(f.done() for f in futures) >= BURST

        model.wait_for(settled, 3 * TIMEOUT)
        running = Message.objects.filter(thread=thread, status=Message.Status.IN_PROGRESS).count()
        model.release()
        outcomes = [future.result(timeout=3 * TIMEOUT) for future in futures]
    assert running == 1, f"{running} runs held the thread at once"
    return outcomes


def assert_one_winner(outcomes: list[Outcome]) -> Outcome:
    statuses = sorted(outcome.status for outcome in outcomes)
    assert statuses == [200] + [409] * (len(outcomes) - 1), [(o.kind, o.status, o.body) for o in outcomes]
    assert {outcome.error for outcome in outcomes if outcome.status == 409} == {"thread_busy"}
    (winner,) = (outcome for outcome in outcomes if outcome.status == 200)
    if winner.kind == "query":
        assert (winner.body["status"], winner.body["response"]) == ("complete", "".join(ANSWER))
    else:
        assert [e["event"] for e in winner.events][-2:] == ["message_complete", "done"], winner.events
        assert winner.events[-2]["status"] == "complete"
    return winner


# --- what must hold afterwards -------------------------------------------------------------------------------------


def assert_invariants(thread: Thread, calls: list[ModelCall]) -> None:
    """No run left holding the thread; `seq` 1, 2, 3 … without a gap, a question then its answer; and each answer's
    model saw every exchange finished before it (as many as AGENT_HISTORY_TURNS), in order."""
    thread.refresh_from_db()
    messages = list(Message.objects.filter(thread=thread).order_by("seq"))
    assert [m.seq for m in messages] == list(range(1, thread.last_seq + 1))
    assert [m.role for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert not [m for m in messages if m.status == Message.Status.IN_PROGRESS]
    calls_by_query = {call.last_user_text: call for call in calls}
    finished: list[str] = []
    for question, answer in zip(messages[::2], messages[1::2], strict=True):
        call = calls_by_query.get(question.content)
        if call is not None:
            seen = [message["content"] for message in call.messages[:-1] if message["role"] == "user"]
            assert seen == finished[-settings.AGENT_HISTORY_TURNS :], f"the model of {question.content!r}"
        if answer.status == Message.Status.COMPLETE:
            finished.append(question.content)


# --- bursts --------------------------------------------------------------------------------------------------------


def test_a_burst_on_one_thread_starts_one_run_and_answers_the_rest_409(servers, model, caller, thread):
    for round_ in range(ROUNDS):
        assert_one_winner(burst(servers, model, caller, thread, f"round {round_}"))

    assert_invariants(thread, model.calls)
    assert Message.objects.filter(thread=thread).count() == 2 * ROUNDS


def test_a_lapsed_lease_is_taken_over_by_one_of_many_callers_at_once(servers, model, caller, thread):
    for round_ in range(ROUNDS):
        dead = begin_run(thread, f"asked of a process that died, {round_}", lease_seconds=-1).assistant_message

        assert_one_winner(burst(servers, model, caller, thread, f"round {round_}"))

        dead.refresh_from_db()
        assert (dead.status, dead.metadata["error"]) == (Message.Status.FAILED, INTERRUPTED)
    assert_invariants(thread, model.calls)


# --- cancels racing starts -----------------------------------------------------------------------------------------


def events_until_done(ws) -> list[dict]:
    events = []
    while not events or events[-1]["event"] != "done":
        events.append(json.loads(ws.recv(timeout=TIMEOUT)))
    return events


def test_a_cancel_sent_right_after_the_query_stops_that_run(servers, model, caller, thread):
    """On one socket the cancel follows the query, whichever process runs it: it stops that run, every time."""
    model.hold()  # a run the cancel missed would never end
    with connect(servers[0].ws_url(thread), additional_headers=caller.headers, proxy=None) as ws:
        for round_ in range(ROUNDS):
            ws.send(json.dumps({"type": "query", "query": f"cancelled at once, {round_}"}))
            ws.send(json.dumps({"type": "cancel"}))
            events = events_until_done(ws)

            complete = next(event for event in events if event["event"] == "message_complete")
            assert complete["status"] == "incomplete", events
    assert_invariants(thread, model.calls)


def test_a_cancel_from_another_socket_racing_the_start_leaves_the_thread_consistent(servers, model, caller, thread):
    """The cancel may reach the run's process before or after its query: either way the run ends once, its socket
    and the canceller's both see it end, and the thread takes the next query."""
    asker_server, canceller_server = servers[0], servers[-1]
    with (
        connect(asker_server.ws_url(thread), additional_headers=caller.headers, proxy=None) as asker,
        connect(canceller_server.ws_url(thread), additional_headers=caller.headers, proxy=None) as canceller,
    ):
        for round_ in range(ROUNDS):
            query = json.dumps({"type": "query", "query": f"raced by a cancel, {round_}"})
            race(partial(asker.send, query), partial(canceller.send, json.dumps({"type": "cancel"})))
            asked, watched = events_until_done(asker), events_until_done(canceller)

            ends = [e for e in asked if e["event"] in ("message_complete", "error")]
            assert len(ends) == 1 and ends[0].get("status") in ("complete", "incomplete"), asked
            assert shape(watched) == shape(asked)
    assert_invariants(thread, model.calls)
    reply = request(asker_server.port, "POST", "/api/v1/agent/query", caller.headers, query_body(thread, "and then?"))
    assert reply.status == 200, reply.body


def query_body(thread: Thread, query: str) -> dict:
    return {"thread_id": str(thread.pk), "query": query}


# --- the lease's writers racing each other -------------------------------------------------------------------------


def race(*writers: Callable[[], object]) -> list[object]:
    """Run the writers at the same moment, each on a thread (and so a database connection) of its own; what each
    returned, or the exception it raised."""
    go = threading.Barrier(len(writers))

    def at_once(writer: Callable[[], object]) -> object:
        go.wait(TIMEOUT)
        try:
            return writer()
        except Exception as exc:
            return exc
        finally:
            connections.close_all()

    with ThreadPoolExecutor(len(writers)) as pool:
        return [future.result(TIMEOUT) for future in [pool.submit(at_once, writer) for writer in writers]]


def lapsed_run(thread: Thread, round_: int) -> Message:
    return begin_run(thread, f"lapsed {round_}", lease_seconds=-1).assistant_message


def renewal(answer: Message) -> Callable[[], bool]:
    """The keeper's renewal of the answer's lease: True when the run still held it."""
    return lambda: answer.pk not in runs_renew(message_ids=[answer.pk], checkpoints={}, lease_seconds=30)


def test_a_renewal_racing_the_sweep_either_keeps_the_run_or_loses_it_never_both(thread):
    for round_ in range(RACES):
        answer = lapsed_run(thread, round_)

        renewed, interrupted = race(renewal(answer), runs_interrupt)

        assert not isinstance(renewed, Exception) and not isinstance(interrupted, Exception), (renewed, interrupted)
        answer.refresh_from_db()
        if renewed:
            assert interrupted == 0
            assert answer.status == Message.Status.IN_PROGRESS and answer.lease_expires_at > timezone.now()
        else:
            assert interrupted == 1
            assert (answer.status, answer.metadata["error"]) == (Message.Status.FAILED, INTERRUPTED)
        Message.objects.filter(pk=answer.pk).update(status=Message.Status.INCOMPLETE, lease_expires_at=None)
    assert_invariants(thread, [])


def test_a_renewal_racing_a_takeover_leaves_exactly_one_run(thread):
    for round_ in range(RACES):
        answer = lapsed_run(thread, round_)

        renewed, taken = race(renewal(answer), partial(begin_run, thread, f"taking over {round_}"))

        assert not isinstance(renewed, Exception), renewed
        answer.refresh_from_db()
        running = Message.objects.filter(thread=thread, status=Message.Status.IN_PROGRESS)
        assert running.count() == 1
        if renewed:
            assert isinstance(taken, ThreadBusy), taken
            assert running.get().pk == answer.pk
        else:
            assert not isinstance(taken, Exception), taken
            assert (answer.status, answer.metadata["error"]) == (Message.Status.FAILED, INTERRUPTED)
            assert running.get().pk == taken.assistant_message.pk
        running.update(status=Message.Status.INCOMPLETE, lease_expires_at=None)
    assert_invariants(thread, [])


# --- the admin racing a run ----------------------------------------------------------------------------------------


@pytest.fixture
def staff(transactional_db) -> Client:
    admin = Client()
    admin.force_login(User.objects.create_superuser("staff", "staff@example.com", "pw"))
    return admin


def test_an_admin_edit_racing_a_run_leaves_the_runs_numbering_and_the_thread_answers(
    servers, model, caller, thread, staff
):
    """The run begins between the admin's read of the thread and its save (from another connection, committed):
    the save must not write the thread's counters back."""
    raced = []

    def begin_meanwhile() -> None:
        raced.extend(race(partial(begin_run, thread, "begun while the admin saved", lease_seconds=-1)))

    saved = admin_rename(staff, thread, "Renamed by staff", meanwhile=begin_meanwhile)

    assert saved.status_code == 302, saved.content.decode()[:2000]
    assert not isinstance(raced[0], Exception), raced
    thread.refresh_from_db()
    assert (thread.title, thread.last_seq) == ("Renamed by staff", 2)
    reply = request(servers[0].port, "POST", "/api/v1/agent/query", caller.headers, query_body(thread, "Hello"))
    assert reply.status == 200, reply.body
    assert_invariants(thread, model.calls)
    assert thread.last_seq == 4


# --- decisions on an approval racing each other ------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "two processes"])
def demo_servers(request, django_db_setup, tmp_path_factory) -> Iterator[list[LiveServer]]:
    """Servers whose model is the offline demo model: "I lost my card" stops for the customer's approval."""
    overrides = {"AGENT_MODEL": "demo"}
    if request.param > 1:
        if not settings.REDIS_URL:
            pytest.skip("two processes share their runs' events and cancels through Redis: needs REDIS_URL")
        overrides["REDIS_URL"] = settings.REDIS_URL
    folder = tmp_path_factory.mktemp("demo-servers")
    started = [LiveServer("granian", server_env(**overrides), folder / f"demo-{n}.log") for n in range(request.param)]
    try:
        for server in started:
            server.start(healthy=True)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def john(demo_customer, caller) -> Caller:
    """The demo customer, whose one card the bank support agent may block."""
    return Caller(key=caller.key, user_id=demo_customer.user_id)


def stop_for_approval(server: LiveServer, john: Caller) -> tuple[Thread, dict]:
    thread = Thread.objects.create(user_id=john.user_id, agent_type="bank_support")
    reply = request(server.port, "POST", "/api/v1/agent/query", john.headers, query_body(thread, "I lost my card"))
    assert reply.status == 200, reply.body
    body = json.loads(reply.body)
    assert body["status"] == "awaiting_approval"
    return thread, body["approval"]


def test_decisions_on_one_approval_at_once_exactly_one_wins_and_the_card_is_as_it_decided(demo_servers, john):
    card = Card.objects.get(customer__user_id=john.user_id)
    for round_ in range(ROUNDS):
        Card.objects.filter(pk=card.pk).update(status=Card.Status.ACTIVE, blocked_at=None)
        thread, approval = stop_for_approval(demo_servers[0], john)
        path = f"/api/v1/threads/{thread.pk}/approvals/{approval['id']}"
        choices = [n % 2 == round_ % 2 for n in range(BURST)]

        replies = race(
            *(
                partial(request, demo_servers[n % len(demo_servers)].port, "POST", path, john.headers, {"approved": c})
                for n, c in enumerate(choices)
            )
        )

        statuses = sorted(reply.status for reply in replies)
        assert statuses == [200] + [409] * (BURST - 1), [(r.status, r.body) for r in replies]
        (won,) = (choice for choice, reply in zip(choices, replies, strict=True) if reply.status == 200)
        assert {json.loads(r.body)["error"]["code"] for r in replies if r.status == 409} == {"approval_decided"}
        card.refresh_from_db()
        assert card.status == ("blocked" if won else "active")
        assert Approval.objects.get(pk=approval["id"]).status == ("approved" if won else "denied")
        answer = Message.objects.get(thread=thread, role="assistant")
        assert (answer.status, answer.output["block_card"]) == ("complete", won)
        assert_invariants(thread, [])


def test_an_approval_survives_its_servers_death_and_the_decision_after_the_restart_blocks_the_card(demo_servers, john):
    if len(demo_servers) > 1:
        pytest.skip("one process is enough to die")
    (server,) = demo_servers
    thread, approval = stop_for_approval(server, john)

    server.kill()
    server.start(healthy=True)
    reply = request(
        server.port, "POST", f"/api/v1/threads/{thread.pk}/approvals/{approval['id']}", john.headers, {"approved": True}
    )

    assert reply.status == 200, (reply.body, server.log_tail())
    assert json.loads(reply.body)["output"]["block_card"] is True
    assert Card.objects.get(customer__user_id=john.user_id).status == "blocked"
