"""The audit trail (audit/, auditlog's table): every change of state is recorded once, with its actor, object,
request id and what it changed, in the change's own transaction; nobody edits or deletes a record."""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from io import StringIO
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from auditlog.models import LogEntry
from channels.testing import WebsocketCommunicator
from django.contrib import admin
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.test import Client
from django.utils import timezone

from audit.trail import record
from bank.models import Card
from bank.services import card_block
from bankagent import context
from bankagent.asgi import application
from identity.models import APIKey
from identity.services import login_ensure
from runs import runner
from tests.asgi import http_call
from tests.conftest import finished_turn
from threads import services
from threads.admin import ThreadAdmin
from threads.models import Approval, Message, Thread

TIMEOUT = 20.0
LOST = "I lost my card"


def records(action: str | None = None) -> list[LogEntry]:
    entries = LogEntry.objects.select_related("content_type", "actor").order_by("timestamp", "pk")
    return list(entries.filter(additional_data__action=action) if action else entries)


def the(action: str) -> LogEntry:
    (entry,) = records(action)
    return entry


def actor_of(entry: LogEntry) -> dict:
    return entry.additional_data["actor"]


def key_actor(prefix: str, user_id: uuid.UUID) -> dict:
    return {"kind": "api_key", "name": prefix, "user_id": str(user_id), "login_id": None}


@pytest.fixture
def created_key(transactional_db) -> tuple[APIKey, str]:
    return APIKey.objects.create_key(name="audit tests")


# Through the ASGI application, as a server runs it


async def call(
    method: str, path: str, key: str, user_id: uuid.UUID, body: dict | None = None, *, request_id: str
) -> tuple[int, dict | None]:
    headers = {"x-api-key": key, "x-user-id": str(user_id), "x-request-id": request_id}
    reply = await http_call(method, path, headers, body)
    return reply.status, reply.json()


@pytest.mark.django_db(transaction=True)
async def test_a_thread_created_renamed_and_deleted_over_the_api_is_recorded_with_the_key_and_request(
    created_key, user_id
):
    key, raw = created_key
    status, thread = await call(
        "POST", "/api/v1/threads", raw, user_id, {"agent_type": "general_chat", "title": "Old"}, request_id="req-1"
    )
    assert status == 201
    path = f"/api/v1/threads/{thread['id']}"
    assert (await call("PATCH", path, raw, user_id, {"title": "New"}, request_id="req-2"))[0] == 200
    assert (await call("DELETE", path, raw, user_id, request_id="req-3"))[0] == 204

    created, renamed, deleted = await sync_to_async(
        lambda: [the(action) for action in ("thread.created", "thread.renamed", "thread.deleted")]
    )()
    assert [entry.cid for entry in (created, renamed, deleted)] == ["req-1", "req-2", "req-3"]
    for entry in (created, renamed, deleted):
        assert actor_of(entry) == key_actor(key.prefix, user_id)
        assert (entry.content_type.model, entry.object_pk) == ("thread", thread["id"])
        assert entry.actor_id is None and entry.remote_addr == "127.0.0.1"
    assert created.changes["title"] == [None, "Old"]
    assert renamed.changes == {"title": ["Old", "New"]}
    assert deleted.changes["title"] == ["New", None]
    # The key is named by its prefix alone.
    assert raw not in json.dumps([entry.additional_data for entry in (created, renamed, deleted)])


@pytest.mark.django_db(transaction=True)
async def test_a_request_that_changes_nothing_records_nothing(created_key, user_id):
    _, raw = created_key
    before = await LogEntry.objects.acount()

    status, _ = await call("POST", "/api/v1/threads", raw, user_id, {"agent_type": "nope"}, request_id="bad")

    assert status == 422
    assert await LogEntry.objects.acount() == before


@pytest.mark.usefixtures("runs_end_with_the_test")
@pytest.mark.django_db(transaction=True)
async def test_a_card_blocked_after_an_approval_over_rest_is_recorded_as_the_deciding_request(
    created_key, demo_customer, user_id
):
    key, raw = created_key
    thread = await Thread.objects.acreate(user_id=user_id, agent_type="bank_support")
    status, stopped = await call(
        "POST", "/api/v1/agent/query", raw, user_id, {"thread_id": str(thread.pk), "query": LOST}, request_id="ask"
    )
    assert status == 200 and stopped["status"] == "awaiting_approval"
    approval_id = stopped["approval"]["id"]
    assert not await LogEntry.objects.filter(additional_data__action="card.blocked").aexists()

    path = f"/api/v1/threads/{thread.pk}/approvals/{approval_id}"
    status, answered = await call("POST", path, raw, user_id, {"approved": True}, request_id="decide")
    assert status == 200 and answered["output"]["block_card"] is True

    approved, blocked = await sync_to_async(lambda: (the("approval.approved"), the("card.blocked")))()
    card = await Card.objects.aget(customer=demo_customer, last4="4242")
    for entry in (approved, blocked):
        assert actor_of(entry) == key_actor(key.prefix, user_id)
        assert entry.cid == "decide"
    assert (approved.content_type.model, approved.object_pk) == ("approval", approval_id)
    assert approved.changes["status"] == ["pending", "approved"]
    assert approved.changes["decided_at"][0] is None and approved.changes["decided_at"][1]
    assert (blocked.content_type.model, blocked.object_id) == ("card", card.pk)
    assert blocked.changes["status"] == ["active", "blocked"]
    assert blocked.changes["blocked_at"][0] is None
    assert blocked.changes["blocked_at"][1] == str(timezone.make_naive(card.blocked_at, UTC))


@pytest.mark.usefixtures("runs_end_with_the_test")
@pytest.mark.django_db(transaction=True)
async def test_a_decision_over_the_websocket_is_recorded_as_the_sockets_key_and_handshake(
    created_key, demo_customer, user_id
):
    key, raw = created_key
    thread = await Thread.objects.acreate(user_id=user_id, agent_type="bank_support")
    headers = [
        (b"host", b"localhost"),
        (b"x-api-key", raw.encode()),
        (b"x-user-id", str(user_id).encode()),
        (b"x-request-id", b"socket-7"),
    ]
    ws = WebsocketCommunicator(application, f"/ws/v1/threads/{thread.pk}/", headers=headers)
    assert (await ws.connect(timeout=TIMEOUT))[0]

    async def until_done() -> list[dict]:
        events = [await ws.receive_json_from(timeout=TIMEOUT)]
        while events[-1]["event"] != "done":
            events.append(await ws.receive_json_from(timeout=TIMEOUT))
        return events

    await ws.send_json_to({"type": "query", "query": LOST})
    required = next(event for event in await until_done() if event["event"] == "approval_required")
    await ws.send_json_to({"type": "approval", "approval_id": required["approval"]["id"], "approved": True})
    await until_done()
    await ws.disconnect()

    approved, blocked = await sync_to_async(lambda: (the("approval.approved"), the("card.blocked")))()
    for entry in (approved, blocked):
        assert actor_of(entry) == key_actor(key.prefix, user_id)
        assert entry.cid == "socket-7"


@pytest.mark.usefixtures("runs_end_with_the_test")
@pytest.mark.django_db(transaction=True)
async def test_a_denial_and_an_expiry_are_recorded_and_block_nothing(created_key, demo_customer, user_id):
    key, raw = created_key
    denied_thread, lapsed_thread = [
        await Thread.objects.acreate(user_id=user_id, agent_type="bank_support") for _ in range(2)
    ]
    asked = [
        await call("POST", "/api/v1/agent/query", raw, user_id, {"thread_id": str(t.pk), "query": LOST}, request_id="a")
        for t in (denied_thread, lapsed_thread)
    ]
    denied_id, lapsed_id = [body["approval"]["id"] for _, body in asked]

    path = f"/api/v1/threads/{denied_thread.pk}/approvals/{denied_id}"
    assert (await call("POST", path, raw, user_id, {"approved": False}, request_id="no"))[0] == 200
    await Approval.objects.filter(pk=lapsed_id).aupdate(expires_at=timezone.now() - timedelta(seconds=1))
    lapsed = await Approval.objects.aget(pk=lapsed_id)
    runner.finish_lapsed(lapsed_thread.pk, lapsed.message_id)
    async with asyncio.timeout(TIMEOUT):
        while (await Message.objects.aget(pk=lapsed.message_id)).status != Message.Status.COMPLETE:
            await asyncio.sleep(0.01)

    denied, expired = await sync_to_async(lambda: (the("approval.denied"), the("approval.expired")))()
    assert (denied.object_pk, denied.cid, actor_of(denied)) == (denied_id, "no", key_actor(key.prefix, user_id))
    assert denied.changes["status"] == ["pending", "denied"]
    assert (expired.object_pk, expired.cid) == (lapsed_id, None)
    assert actor_of(expired) == {"kind": "system", "name": "approval expiry", "user_id": None, "login_id": None}
    assert expired.changes["status"] == ["pending", "expired"]
    assert not await LogEntry.objects.filter(additional_data__action="card.blocked").aexists()


# Session users, staff, commands


@pytest.mark.django_db
def test_a_chat_login_is_the_actor_of_its_api_calls():
    alice, _ = login_ensure(username="alice", password="unused", user_id=uuid.UUID(int=7))
    browser = Client()
    browser.force_login(alice)

    outside = context.Actor(kind="system", name="the test")
    with context.bound(request_id="chat-1"), context.acting(outside):
        response = browser.post("/api/v1/threads", {"agent_type": "general_chat"}, content_type="application/json")
        assert context.actor.get() is outside  # the request's actor ended with it

    assert response.status_code == 201, response.content
    created = the("thread.created")
    assert actor_of(created) == {
        "kind": "login",
        "name": "alice",
        "user_id": str(uuid.UUID(int=7)),
        "login_id": alice.pk,
    }
    assert (created.actor, created.cid) == (alice, "chat-1")


@pytest.fixture
def staff(db) -> tuple[User, Client]:
    user = User.objects.create_superuser("root", "root@example.com", "unused")
    browser = Client()
    browser.force_login(user)
    return user, browser


STAFF = {"kind": "staff", "name": "root", "user_id": None}


def test_a_thread_renamed_in_the_admin_is_recorded_as_its_staff_user(staff, make_thread):
    user, browser = staff
    thread = make_thread(title="Before")
    form = {"title": "After", "metadata": "{}", "messages-TOTAL_FORMS": 0, "messages-INITIAL_FORMS": 0}

    with context.bound(request_id="admin-1"):  # what the ASGI middleware binds for every request
        response = browser.post(f"/admin/threads/thread/{thread.pk}/change/", form)

    assert response.status_code == 302, response.content
    renamed = the("thread.renamed")
    assert (renamed.actor, renamed.cid, renamed.object_pk) == (user, "admin-1", str(thread.pk))
    assert actor_of(renamed) == {**STAFF, "login_id": user.pk}
    assert renamed.changes == {"title": ["Before", "After"]}


def test_an_api_key_created_by_command_and_revoked_in_the_admin_is_recorded(staff):
    user, browser = staff
    out = StringIO()
    call_command("create_api_key", "partner", stdout=out)
    raw = out.getvalue().splitlines()[-1]
    key = APIKey.objects.get(name="partner")

    response = browser.post(
        f"/admin/identity/apikey/{key.pk}/change/", {"name": "partner", "revoked": "on", "events": "standard"}
    )

    assert response.status_code == 302, response.content
    created, revoked = the("api_key.created"), the("api_key.revoked")
    assert actor_of(created) == {"kind": "command", "name": "create_api_key", "user_id": None, "login_id": None}
    assert created.changes["prefix"] == [None, key.prefix] and "hashed_key" not in created.changes
    assert (revoked.actor, revoked.changes) == (user, {"revoked": [False, True]})
    assert actor_of(revoked) == {**STAFF, "login_id": user.pk}
    assert raw not in json.dumps([created.additional_data, created.changes, revoked.changes])


def test_a_customer_edited_in_the_admin_is_recorded(staff, demo_customer):
    user, browser = staff
    response = browser.get(f"/admin/bank/customer/{demo_customer.pk}/change/")
    assert response.status_code == 200
    form = {
        name: value
        for name, value in response.context["adminform"].form.initial.items()
        if name in ("user_id", "name", "balance", "pending", "currency")
    }
    inlines = {
        "cards-TOTAL_FORMS": 0,
        "cards-INITIAL_FORMS": 0,
        "transactions-TOTAL_FORMS": 0,
        "transactions-INITIAL_FORMS": 0,
    }

    response = browser.post(f"/admin/bank/customer/{demo_customer.pk}/change/", {**form, "name": "Johnny", **inlines})

    assert response.status_code == 302, response.content
    updated = the("customer.updated")
    assert (updated.actor, updated.changes) == (user, {"name": ["John", "Johnny"]})


def test_a_record_holds_the_objects_own_fields_and_no_secret(db):
    user = User.objects.create_user("bob", password="s3cret-password")
    key, raw = APIKey.objects.create_key(name="partner")

    user_created, key_created = the("user.created"), the("api_key.created")

    assert user_created.changes["password"] == ["(hidden)", "(hidden)"]
    assert "profile" not in user_created.changes and "last_login" not in user_created.changes
    assert set(key_created.changes) == {"name", "prefix", "revoked", "events"}  # expiry_date: None, unchanged
    assert user.password not in json.dumps(user_created.changes)
    assert key.hashed_key not in json.dumps(key_created.changes) and raw not in json.dumps(key_created.changes)


# Transactions


@pytest.mark.django_db
def test_a_change_rolled_back_leaves_no_record(make_thread):
    thread = make_thread(title="Kept")
    before = LogEntry.objects.count()

    with pytest.raises(RuntimeError), transaction.atomic():
        services.thread_update(thread=thread, title="Lost")
        raise RuntimeError("the request failed after the rename")

    thread.refresh_from_db()
    assert thread.title == "Kept"
    assert LogEntry.objects.count() == before


@pytest.mark.django_db
def test_a_change_whose_record_cannot_be_written_is_not_made(demo_customer, monkeypatch):
    def refuse(*args, **kwargs):
        raise DatabaseError("the audit table is unavailable")

    monkeypatch.setattr(LogEntry.objects, "create", refuse)

    with pytest.raises(DatabaseError):
        card_block(customer_id=demo_customer.pk, last4="4242")
    with pytest.raises(DatabaseError):
        services.thread_create(user_id=uuid.uuid4(), agent_type="general_chat")

    assert Card.objects.get(customer=demo_customer, last4="4242").status == "active"
    assert not Thread.objects.exists()


@pytest.mark.django_db
def test_a_card_blocked_twice_is_recorded_once(demo_customer):
    with context.acting(context.Actor(kind="system", name="test")):
        first = card_block(customer_id=demo_customer.pk, last4="4242")
        second = card_block(customer_id=demo_customer.pk, last4="4242")

    assert (first.already, second.already) == (False, True)
    assert actor_of(the("card.blocked")) == {"kind": "system", "name": "test", "user_id": None, "login_id": None}


# The admin: read only


@pytest.fixture
def trail(db, make_thread) -> Thread:
    """A thread renamed by an API key, and one record of its own making."""
    thread = make_thread(title="One")
    who = context.Actor(kind="api_key", name="PrEfIx99", user_id=str(thread.user_id))
    with context.bound(request_id="find-me"), context.acting(who):
        services.thread_update(thread=thread, title="Two")
    return thread


def test_the_admin_lists_filters_and_searches_records(admin_client, trail):
    listing = admin_client.get("/admin/auditlog/logentry/")
    by_action = admin_client.get("/admin/auditlog/logentry/", {"audit_action": "thread.renamed"})
    by_prefix = admin_client.get("/admin/auditlog/logentry/", {"q": "PrEfIx99"})
    by_request = admin_client.get("/admin/auditlog/logentry/", {"q": "find-me"})
    by_object = admin_client.get("/admin/auditlog/logentry/", {"q": str(trail.pk)})
    nothing = admin_client.get("/admin/auditlog/logentry/", {"q": "no-such-request"})

    for response in (listing, by_action, by_prefix, by_request, by_object, nothing):
        assert response.status_code == 200
    assert [entry.pk for entry in by_action.context["cl"].result_list] == [the("thread.renamed").pk]
    assert [entry.pk for entry in by_prefix.context["cl"].result_list] == [the("thread.renamed").pk]
    assert [entry.pk for entry in by_request.context["cl"].result_list] == [the("thread.renamed").pk]
    assert by_object.context["cl"].result_count == 2  # created, renamed
    assert nothing.context["cl"].result_count == 0
    content = listing.content.decode()
    assert "thread.renamed" in content and "api_key PrEfIx99" in content


def test_nobody_adds_edits_or_deletes_a_record_in_the_admin(admin_client, trail):
    entry = the("thread.renamed")
    base = "/admin/auditlog/logentry/"

    page = admin_client.get(f"{base}{entry.pk}/change/")
    edit = admin_client.post(f"{base}{entry.pk}/change/", {"cid": "forged"})
    delete = admin_client.post(f"{base}{entry.pk}/delete/", {"post": "yes"})
    add = admin_client.get(f"{base}add/")
    bulk = admin_client.post(base, {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"})

    assert page.status_code == 200 and "find-me" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    assert (edit.status_code, delete.status_code, add.status_code) == (403, 403, 403)
    assert bulk.status_code in (200, 302)
    entry.refresh_from_db()
    assert entry.cid == "find-me" and LogEntry.objects.filter(pk=entry.pk).exists()


def test_the_thread_page_lists_the_records_of_the_thread_and_of_its_approvals(admin_client, trail):
    _, answer = finished_turn(trail, status=Message.Status.AWAITING_APPROVAL, answer="")
    approval = Approval.objects.create(
        message=answer, tool_name="block_card", tool_call_id="call-1", expires_at=timezone.now()
    )
    who = context.Actor(kind="api_key", name="PrEfIx99", user_id=str(trail.user_id))
    with context.bound(request_id="decided-here"), context.acting(who):
        record(approval, "approval.denied", {"status": ("pending", "denied")})
    elsewhere = finished_turn(Thread.objects.create(user_id=trail.user_id), status=Message.Status.AWAITING_APPROVAL)[1]
    other = Approval.objects.create(
        message=elsewhere, tool_name="block_card", tool_call_id="call-2", expires_at=timezone.now()
    )
    record(other, "approval.approved", {"status": ("pending", "approved")})

    content = admin_client.get(f"/admin/threads/thread/{trail.pk}/change/").content.decode()

    assert "Audit trail" in content
    assert "thread.renamed" in content and "title: One → Two" in content and "find-me" in content
    assert "thread.created" in content and "api_key PrEfIx99" in content
    assert "approval.denied" in content and "decided-here" in content
    assert "approval.approved" not in content
    assert ThreadAdmin(Thread, admin.site).audit_trail(Thread(user_id=uuid.uuid4())) == "No records yet."


# The export


def export(*args: str) -> list[dict]:
    out = StringIO()
    call_command("audit_export", *args, stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture
def dated(db, user_id) -> Thread:
    """A thread created on 1 January 2026 at midnight UTC and renamed on the 5th."""
    timestamp = LogEntry._meta.get_field("timestamp")
    with mock.patch.object(timestamp, "_get_default", lambda: datetime(2026, 1, 1, tzinfo=UTC)):
        thread = services.thread_create(user_id=user_id, agent_type="general_chat", title="One")
    who = context.Actor(kind="api_key", name="PrEfIx99", user_id=str(user_id))
    with (
        mock.patch.object(timestamp, "_get_default", lambda: datetime(2026, 1, 5, tzinfo=UTC)),
        context.bound(request_id="find-me"),
        context.acting(who),
    ):
        services.thread_update(thread=thread, title="Two")
    return thread


def test_the_export_writes_one_json_line_per_record_in_the_window(dated):
    renamed = the("thread.renamed")

    lines = export("--since", "2026-01-03")

    assert lines == [
        {
            "id": renamed.pk,
            "time": "2026-01-05T00:00:00+00:00",
            "action": "thread.renamed",
            "object_type": "threads.thread",
            "object_id": str(dated.pk),
            "object_repr": "Two",
            "actor": {"kind": "api_key", "name": "PrEfIx99", "user_id": str(dated.user_id), "login_id": None},
            "request_id": "find-me",
            "changes": {"title": ["One", "Two"]},
            "remote_addr": None,
        }
    ]


@pytest.mark.parametrize(
    ("args", "actions"),
    [
        (["--since", "2026-01-01"], ["thread.created", "thread.renamed"]),
        (["--since", "2026-01-01", "--until", "2026-01-05"], ["thread.created"]),
        (["--since", "2026-01-05T00:00:00Z"], ["thread.renamed"]),
        (["--since", "2026-01-04T23:00:00-02:00"], []),
        (["--since", "2026-01-04 23:59:59.999999"], ["thread.renamed"]),
        (["--since", "2026-01-06"], []),
    ],
)
def test_the_export_window_starts_at_since_and_ends_before_until(dated, args, actions):
    assert [line["action"] for line in export(*args)] == actions


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since must be an ISO date or date-time"),
        (["--since", "2026-02-30"], "--since must be an ISO date or date-time"),
        (["--since", "2026-01-02", "--until", "soon"], "--until must be an ISO date or date-time"),
        (["--since", "2026-01-02", "--until", "2026-01-01"], "--until must be later than --since"),
        ([], "--since"),
    ],
)
def test_the_export_refuses_a_bad_window_clearly(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("audit_export", *args, stdout=StringIO())


# The database itself


@pytest.mark.django_db
def test_postgresql_refuses_to_change_or_delete_a_record_but_lets_a_deleted_login_go(staff, make_thread):
    if connection.vendor != "postgresql":
        pytest.skip("the append-only trigger is PostgreSQL's (SQLite has none)")
    user, _ = staff
    thread = make_thread()
    with context.acting(context.Actor(kind="staff", name="root", login_id=user.pk)):
        services.thread_update(thread=thread, title="Checked")
    entry = the("thread.renamed")

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LogEntry.objects.filter(pk=entry.pk).update(cid="forged")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        LogEntry.objects.filter(pk=entry.pk).delete()
    user.delete()

    entry.refresh_from_db()
    assert (entry.actor_id, entry.cid, actor_of(entry)["name"]) == (None, None, "root")
