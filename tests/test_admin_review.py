"""The admin as staff's review desk: conversations listed with what flags them, read as transcripts, exported as
JSON; reviewers who read everything and change nothing; the bank's data to browse, not to edit."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Group, Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from genai_prices import calc_price
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from bank.models import Card, Customer, Transaction
from bank.seed import demo_customer_create
from runs.lease import cost_metadata
from runs.runner import decide_blocking, run_blocking
from runs.services import INTERRUPTED
from tests.conftest import finished_turn
from threads.models import Approval, Message, Thread
from threads.selectors import threads_for_review

THREADS = "/admin/threads/thread/"
LOST_CARD = {
    "support_advice": "John, we blocked your card ending in 4242 so nobody can use it.",
    "block_card": True,
    "risk_level": 8,
    "follow_up_actions": ["Order a replacement card", "Check your recent transactions"],
}
BALANCE = {
    "support_advice": "John, your balance is $1,123.45.",
    "block_card": False,
    "risk_level": 1,
    "follow_up_actions": [],
}
BLOCK_CALL = {"name": "block_card", "args": {"last4": "4242"}, "result": "blocked", "outcome": "success"}
BALANCE_CALL = {"name": "customer_balance", "args": {"include_pending": True}, "result": 1118.95, "outcome": "success"}


def page(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def answered(
    thread: Thread,
    query: str,
    output: dict | None,
    *,
    tool_calls: list | None = None,
    status: str = Message.Status.COMPLETE,
    metadata: dict | None = None,
    tokens: int = 100,
) -> Message:
    """A finished exchange, the answer as a run saves it (its tool calls with their durations)."""
    metadata = {
        "model": "demo",
        "duration_ms": 250,
        "usage": {"total_tokens": tokens},
        "cost": None,
        **(metadata or {}),
    }
    content = json.dumps(output) if output is not None else "" if status == "awaiting_approval" else "Hello there."
    _, answer = finished_turn(thread, query=query, answer=content, output=output, status=status, metadata=metadata)
    if tool_calls:
        Message.objects.filter(pk=answer.pk).update(tool_calls=[{"duration_ms": 12, **call} for call in tool_calls])
        answer.refresh_from_db()
    return answer


def waiting_for_approval(thread: Thread, query: str = "Someone stole my card") -> Approval:
    pending = {**BLOCK_CALL, "result": None, "outcome": "pending", "duration_ms": None}
    answer = answered(thread, query, None, status=Message.Status.AWAITING_APPROVAL, tool_calls=[pending])
    return Approval.objects.create(
        message=answer,
        tool_name="block_card",
        tool_call_id="call-1",
        args={"last4": "4242"},
        expires_at=timezone.now() + timedelta(minutes=10),
    )


@pytest.fixture
def john(db) -> Customer:
    demo_customer_create()
    return Customer.objects.get(name="John")


@pytest.fixture
def reviewer(db) -> User:
    user = User.objects.create_user("rita", password="unused", is_staff=True)
    user.groups.add(Group.objects.get(name="Reviewers"))
    return user


@pytest.fixture
def reviewer_client(reviewer) -> Client:
    client = Client()
    client.force_login(reviewer)
    return client


# The list


def test_the_list_shows_each_threads_messages_activity_latest_status_risk_card_and_tokens(make_thread):
    lost = make_thread(title="Lost card")
    answered(lost, "What is my balance?", BALANCE, tool_calls=[BALANCE_CALL], tokens=120)
    answered(lost, "I lost my card", LOST_CARD, tool_calls=[BLOCK_CALL], tokens=300)
    chat = make_thread(title="Poem", agent_type="general_chat")
    answered(chat, "A poem please", None, status=Message.Status.FAILED, metadata={"error": INTERRUPTED}, tokens=0)
    empty = make_thread(title="Empty")

    rows = {thread.title: thread for thread in threads_for_review(Thread.objects.all())}

    latest = Message.objects.filter(thread=lost).order_by("-seq").first()
    summary = {
        title: (
            row.message_count,
            row.latest_status,
            row.latest_error,
            row.max_risk,
            row.card_blocked,
            row.total_tokens,
        )
        for title, row in rows.items()
    }
    assert summary == {
        "Lost card": (4, "complete", None, 8, True, 420),
        "Poem": (2, "failed", "run_interrupted", None, False, 0),
        "Empty": (0, None, None, None, False, 0),
    }
    assert rows["Lost card"].last_activity == latest.created_at
    assert rows["Empty"].last_activity == empty.created_at


def test_the_list_page_renders_the_columns(admin_client, make_thread):
    thread = make_thread(title="Lost card")
    answered(thread, "I lost my card", LOST_CARD, tool_calls=[BLOCK_CALL], tokens=321)
    chat = make_thread(title="Poem", agent_type="general_chat")
    answered(chat, "A poem please", None, status=Message.Status.FAILED, metadata={"error": INTERRUPTED})

    content = page(admin_client.get(THREADS))

    for heading in ("Messages", "Last activity", "Latest answer", "Highest risk", "Card blocked", "Tokens"):
        assert heading in content
    assert "321" in content
    assert ">8<" in content
    assert "interrupted (the server stopped while writing it)" in content
    assert 'alt="True"' in content and 'alt="False"' in content


@pytest.mark.parametrize(
    ("tool_calls", "output", "blocked"),
    [
        ([BLOCK_CALL], {**LOST_CARD, "block_card": False}, True),  # the tool ran, whatever the output says
        ([], LOST_CARD, True),
        ([{**BLOCK_CALL, "outcome": "denied"}], {**LOST_CARD, "block_card": False}, False),
        ([{**BLOCK_CALL, "outcome": "failed"}], {**LOST_CARD, "block_card": False}, False),
        ([BALANCE_CALL], BALANCE, False),
    ],
    ids=["ran", "output-says-so", "denied", "failed", "other-tool"],
)
def test_a_card_was_blocked_when_the_answer_says_so_or_its_block_card_call_ran(
    make_thread, tool_calls, output, blocked
):
    thread = make_thread()
    answered(thread, "Help with my card", output, tool_calls=tool_calls)

    assert threads_for_review(Thread.objects.all()).get().card_blocked is blocked


@pytest.fixture
def flagged(make_thread) -> dict[str, Thread]:
    """One thread for each thing the list filters on."""
    threads = {name: make_thread(title=f"{name} thread") for name in ["calm", "risky", "failed", "interrupted"]}
    threads["incomplete"] = make_thread(title="incomplete thread", agent_type="general_chat")
    threads["waiting"] = make_thread(title="waiting thread")
    answered(threads["calm"], "What is my balance?", BALANCE)
    answered(threads["risky"], "I lost my card", LOST_CARD, tool_calls=[BLOCK_CALL])
    failure = {"error": {"code": "model_error", "message": "The model failed."}}
    answered(threads["failed"], "Balance?", None, status=Message.Status.FAILED, metadata=failure)
    answered(threads["interrupted"], "Balance?", None, status=Message.Status.FAILED, metadata={"error": INTERRUPTED})
    answered(threads["incomplete"], "Tell me a story", None, status=Message.Status.INCOMPLETE)
    waiting_for_approval(threads["waiting"])
    return threads


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"answer_status": "failed"}, {"failed", "interrupted"}),
        ({"answer_status": "run_interrupted"}, {"interrupted"}),
        ({"answer_status": "incomplete"}, {"incomplete"}),
        ({"answer_status": "awaiting_approval"}, {"waiting"}),
        ({"risk": "high"}, {"risky"}),
        ({"card_blocked": "yes"}, {"risky"}),
        ({"card_blocked": "no"}, {"calm", "failed", "interrupted", "incomplete", "waiting"}),
        ({"agent_type__exact": "general_chat"}, {"incomplete"}),
        ({"q": "tell me a STORY"}, {"incomplete"}),  # the messages' content is searched
        ({"answer_status": "failed", "q": "interrupted thread"}, {"interrupted"}),
    ],
)
def test_the_list_filters_and_searches(admin_client, flagged, query, expected):
    content = page(admin_client.get(THREADS, query))

    shown = {name for name in flagged if f"{name} thread" in content}
    assert shown == expected


def test_the_list_filters_by_date(admin_client, flagged):
    Thread.objects.filter(pk=flagged["calm"].pk).update(created_at=timezone.now() - timedelta(days=400))
    year = timezone.now().year

    content = page(admin_client.get(THREADS, {"created_at__year": year}))

    assert "risky thread" in content and "calm thread" not in content


def list_queries(client: Client, query: dict[str, str]) -> int:
    with CaptureQueriesContext(connection) as captured:
        page(client.get(THREADS, query))
    return len(captured)


@pytest.mark.parametrize(
    "query", [{}, {"q": "card"}, {"risk": "high", "card_blocked": "yes", "answer_status": "awaiting_approval"}]
)
def test_the_list_takes_as_many_queries_for_twenty_threads_as_for_two(admin_client, make_thread, query):
    def add_threads(count: int) -> None:
        for _ in range(count):
            thread = make_thread(title="Lost card")
            answered(thread, "What is my balance?", BALANCE, tool_calls=[BALANCE_CALL])
            answered(thread, "I lost my card", LOST_CARD, tool_calls=[BLOCK_CALL])
            waiting_for_approval(thread)

    add_threads(2)
    for_two = list_queries(admin_client, query)
    add_threads(18)
    for_twenty = list_queries(admin_client, query)

    assert for_twenty == for_two
    assert page(admin_client.get(THREADS, query)).count('name="_selected_action"') == 20


# The thread page


@pytest.fixture
def bank_thread(make_thread) -> Thread:
    thread = make_thread(title="Card trouble")
    answered(thread, "What is my balance?", BALANCE, tool_calls=[BALANCE_CALL], tokens=150)
    answered(thread, "I lost my card", LOST_CARD, tool_calls=[BLOCK_CALL], tokens=250)
    waiting_for_approval(thread, "And my other card was stolen")
    return thread


def test_the_thread_page_reads_as_a_transcript(admin_client, bank_thread):
    content = page(admin_client.get(f"{THREADS}{bank_thread.pk}/change/"))

    expected = [
        "What is my balance?",
        'class="risk-pill low"',
        "John, your balance is $1,123.45.",
        "customer_balance",
        "I lost my card",
        'class="risk-pill high"',
        "John, we blocked your card ending in 4242 so nobody can use it.",
        "Order a replacement card",
        "Check your recent transactions",
        "block_card",
        "And my other card was stolen",
        "awaiting approval",
        "Approval of <strong>block_card</strong>: pending",
    ]
    positions = [content.find(text) for text in expected]
    assert -1 not in positions, dict(zip(expected, positions, strict=True))
    assert positions == sorted(positions)
    assert "risk 8" in content and "risk 1" in content
    assert "{&quot;last4&quot;: &quot;4242&quot;}" in content  # the tool's arguments
    assert "12 ms" in content  # a tool call's duration
    assert "&quot;support_advice&quot;" not in content  # answers are not shown as JSON


def test_the_thread_page_shows_each_answers_model_time_tokens_and_cost_and_the_totals(admin_client, make_thread):
    thread = make_thread()
    answered(thread, "Balance?", BALANCE, tokens=150, metadata={"duration_ms": 1200})
    priced = {"model": "openai:gpt-4o", "duration_ms": 800, "usage": {"total_tokens": 250}, "cost": "0.0075"}
    answered(thread, "Card?", LOST_CARD, metadata=priced)

    content = page(admin_client.get(f"{THREADS}{thread.pk}/change/"))

    assert "model demo" in content and "model openai:gpt-4o" in content
    assert "1200 ms" in content and "800 ms" in content
    assert "150 tokens" in content and "250 tokens" in content
    assert "cost unknown" in content and "cost $0.0075" in content
    totals = content[content.find('class="totals"') :]
    assert "<dd>4</dd>" in totals and "<dd>400</dd>" in totals and "<dd>2000 ms</dd>" in totals
    assert "$0.0075 + 1 unpriced" in totals


def test_a_plain_answer_reads_as_its_text(admin_client, make_thread):
    thread = make_thread(agent_type="general_chat")
    answered(thread, "Say hello", None)

    content = page(admin_client.get(f"{THREADS}{thread.pk}/change/"))

    assert "Say hello" in content and "Hello there." in content and 'class="risk-pill' not in content
    assert "Estimated cost</dt><dd>unknown" in content


def test_the_thread_page_reads_a_real_exchange_of_the_demo_model_with_its_approval(admin_client, make_thread, john):
    thread = make_thread()
    waiting = async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query="I lost my card")
    approval = Approval.objects.get(message=waiting.assistant_message)

    before = page(admin_client.get(f"{THREADS}{thread.pk}/change/"))
    async_to_sync(decide_blocking)(
        user_id=thread.user_id, thread_id=thread.pk, approval_id=approval.pk, approved=True, note="yes, block it"
    )
    after = page(admin_client.get(f"{THREADS}{thread.pk}/change/"))

    assert "Approval of <strong>block_card</strong>: pending" in before
    assert "Approval of <strong>block_card</strong>: approved" in after and "yes, block it" in after
    assert "card blocked" in after and "risk-pill" in after and "cost unknown" in after
    answer = Message.objects.get(pk=waiting.assistant_message.pk)
    assert answer.metadata["cost"] is None  # the demo model has no price
    assert threads_for_review(Thread.objects.filter(pk=thread.pk)).get().card_blocked
    assert Card.objects.get(customer=john).status == Card.Status.BLOCKED


def test_the_thread_page_has_no_messages_to_edit(admin_client, bank_thread):
    content = page(admin_client.get(f"{THREADS}{bank_thread.pk}/change/"))

    assert "messages-TOTAL_FORMS" not in content
    assert 'name="title"' in content  # what staff may edit of the thread itself


# Export


def test_a_thread_exports_as_json_with_every_message_and_its_approval(admin_client, bank_thread):
    response = admin_client.get(f"{THREADS}{bank_thread.pk}/export/")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert f'filename="thread-{bank_thread.pk}.json"' in response["Content-Disposition"]
    exported = response.json()
    assert {key: exported[key] for key in ("id", "user_id", "agent_type", "title")} == {
        "id": str(bank_thread.pk),
        "user_id": str(bank_thread.user_id),
        "agent_type": "bank_support",
        "title": "Card trouble",
    }
    messages = exported["messages"]
    assert [message["seq"] for message in messages] == [1, 2, 3, 4, 5, 6]
    assert messages[1]["output"] == BALANCE
    assert messages[3]["tool_calls"] == [{"duration_ms": 12, **BLOCK_CALL}]
    assert messages[3]["metadata"]["usage"]["total_tokens"] == 250
    assert [message["status"] for message in messages][-1] == "awaiting_approval"
    [approval] = messages[5]["approvals"]
    assert (approval["tool"], approval["args"], approval["status"]) == ("block_card", {"last4": "4242"}, "pending")
    assert messages[4]["content"] == "And my other card was stolen"
    assert "model_messages" not in messages[1]


def test_the_thread_page_links_to_its_export(admin_client, bank_thread):
    content = page(admin_client.get(f"{THREADS}{bank_thread.pk}/change/"))

    assert f'href="{THREADS}{bank_thread.pk}/export/"' in content


def test_selected_threads_export_as_one_json_file(admin_client, bank_thread, make_thread):
    other = make_thread(title="Other")
    answered(other, "Hi", BALANCE)
    make_thread(title="Not selected")

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.post(
            THREADS, {"action": "export_json", "_selected_action": [str(bank_thread.pk), str(other.pk)]}
        )

    assert response.status_code == 200
    exported = {thread["title"]: thread for thread in response.json()}
    assert set(exported) == {"Card trouble", "Other"}
    assert len(exported["Card trouble"]["messages"]) == 6
    assert exported["Other"]["messages"][1]["output"] == BALANCE
    assert len(captured) < 12  # the messages and approvals of all the threads at once


@pytest.mark.parametrize("thread_id", ["00000000-0000-4000-8000-000000000099", "not-a-uuid"])
def test_exporting_a_missing_thread_is_not_found(admin_client, thread_id):
    assert admin_client.get(f"{THREADS}{thread_id}/export/").status_code == 404


def test_exporting_needs_a_staff_login(bank_thread):
    response = Client().get(f"{THREADS}{bank_thread.pk}/export/")

    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# Roles


def test_the_reviewers_group_may_view_conversations_and_bank_data_and_nothing_else(db):
    reviewers = Group.objects.get(name="Reviewers")

    granted = {(p.content_type.app_label, p.codename) for p in reviewers.permissions.select_related("content_type")}

    assert granted == {
        ("threads", "view_thread"),
        ("threads", "view_message"),
        ("threads", "view_approval"),
        ("bank", "view_customer"),
        ("bank", "view_card"),
        ("bank", "view_transaction"),
    }


def test_a_reviewer_lists_threads_and_reads_their_transcripts_and_exports(reviewer_client, bank_thread):
    listing = page(reviewer_client.get(THREADS, {"risk": "high"}))
    transcript = page(reviewer_client.get(f"{THREADS}{bank_thread.pk}/change/"))
    exported = reviewer_client.get(f"{THREADS}{bank_thread.pk}/export/")

    assert "Card trouble" in listing
    assert "Export selected threads as JSON" in listing and "Delete selected" not in listing
    assert "John, we blocked your card ending in 4242 so nobody can use it." in transcript
    assert 'name="title"' not in transcript and 'name="_save"' not in transcript
    assert "Delete" not in transcript.split('id="content-main"')[1]
    assert exported.status_code == 200 and len(exported.json()["messages"]) == 6


def test_a_reviewer_cannot_change_or_delete_a_thread(reviewer_client, bank_thread):
    changed = reviewer_client.post(
        f"{THREADS}{bank_thread.pk}/change/",
        {"title": "Renamed", "metadata": "{}"},
    )
    delete_page = reviewer_client.get(f"{THREADS}{bank_thread.pk}/delete/")
    deleted = reviewer_client.post(f"{THREADS}{bank_thread.pk}/delete/", {"post": "yes"})
    bulk = reviewer_client.post(THREADS, {"action": "delete_selected", "_selected_action": [str(bank_thread.pk)]})

    assert (changed.status_code, delete_page.status_code, deleted.status_code) == (403, 403, 403)
    assert bulk.status_code in {200, 302}  # the action is not offered: nothing happens
    bank_thread.refresh_from_db()
    assert bank_thread.title == "Card trouble"
    assert Message.objects.filter(thread=bank_thread).count() == 6


def test_a_reviewer_reads_messages_but_cannot_edit_or_add_them(reviewer_client, bank_thread):
    message = Message.objects.get(thread=bank_thread, seq=2)

    shown = page(reviewer_client.get(f"/admin/threads/message/{message.pk}/change/"))
    edited = reviewer_client.post(f"/admin/threads/message/{message.pk}/change/", {"content": "Rewritten"})
    added = reviewer_client.get("/admin/threads/message/add/")
    deleted = reviewer_client.post(f"/admin/threads/message/{message.pk}/delete/", {"post": "yes"})

    assert "John, your balance is $1,123.45." in shown and 'name="content"' not in shown
    assert (edited.status_code, added.status_code, deleted.status_code) == (403, 403, 403)
    message.refresh_from_db()
    assert message.output == BALANCE


def test_no_one_edits_messages_in_the_admin_a_superuser_neither(admin_client, bank_thread):
    message = Message.objects.get(thread=bank_thread, seq=2)

    edited = admin_client.post(f"/admin/threads/message/{message.pk}/change/", {"content": "Rewritten"})
    added = admin_client.get("/admin/threads/message/add/")

    assert (edited.status_code, added.status_code) == (403, 403)
    message.refresh_from_db()
    assert message.content == json.dumps(BALANCE)


def test_a_superuser_deletes_a_thread_with_its_messages_and_approvals(admin_client, bank_thread):
    confirm = page(admin_client.get(f"{THREADS}{bank_thread.pk}/delete/"))
    deleted = admin_client.post(f"{THREADS}{bank_thread.pk}/delete/", {"post": "yes"})

    assert "Are you sure" in confirm
    assert deleted.status_code == 302
    assert not Thread.objects.filter(pk=bank_thread.pk).exists()
    assert not Message.objects.filter(thread_id=bank_thread.pk).exists()
    assert not Approval.objects.exists()


def test_a_superuser_deletes_selected_threads(admin_client, bank_thread, make_thread):
    kept = make_thread(title="Kept")
    form = {"action": "delete_selected", "_selected_action": [str(bank_thread.pk)]}

    confirm = page(admin_client.post(THREADS, form))
    deleted = admin_client.post(THREADS, {**form, "post": "yes"})

    assert "Are you sure" in confirm
    assert deleted.status_code == 302
    assert list(Thread.objects.values_list("pk", flat=True)) == [kept.pk]


def test_staff_may_delete_a_thread_with_the_permissions_to_delete_it_and_its_messages(
    reviewer, reviewer_client, bank_thread
):
    reviewer.user_permissions.add(Permission.objects.get(codename="delete_thread"))
    refused = reviewer_client.post(f"{THREADS}{bank_thread.pk}/delete/", {"post": "yes"})
    reviewer.user_permissions.add(Permission.objects.get(codename="delete_message"))
    deleted = reviewer_client.post(f"{THREADS}{bank_thread.pk}/delete/", {"post": "yes"})

    assert (refused.status_code, deleted.status_code) == (403, 302)
    assert not Thread.objects.filter(pk=bank_thread.pk).exists()


# Bank data


def test_cards_list_with_their_blocked_state_and_time(admin_client, john):
    card = Card.objects.get(customer=john)
    Card.objects.filter(pk=card.pk).update(status=Card.Status.BLOCKED, blocked_at=timezone.now())
    Card.objects.create(customer=john, last4="1881", kind="credit")

    listing = page(admin_client.get("/admin/bank/card/"))
    blocked = page(admin_client.get("/admin/bank/card/", {"status__exact": "blocked"}))
    searched = page(admin_client.get("/admin/bank/card/", {"q": "1881"}))

    assert "4242" in listing and "1881" in listing and "John" in listing
    assert "4242" in blocked and "1881" not in blocked
    assert "1881" in searched and "4242" not in searched


def test_transactions_list_search_and_filter(admin_client, john):
    listing = page(admin_client.get("/admin/bank/transaction/"))
    searched = page(admin_client.get("/admin/bank/transaction/", {"q": "coffee"}))
    pending = page(admin_client.get("/admin/bank/transaction/", {"pending__exact": "1"}))

    assert "Corner Coffee" in listing and "City Grocery" in listing and "-62.18" in listing
    assert "Corner Coffee" in searched and "City Grocery" not in searched
    assert "Corner Coffee" in pending and "City Grocery" not in pending


def test_customers_list_with_their_cards(admin_client, john):
    Card.objects.create(customer=john, last4="1881", kind="credit", status=Card.Status.BLOCKED)

    content = page(admin_client.get("/admin/bank/customer/", {"q": "john"}))

    assert "John" in content and "1123.45" in content
    assert '<td class="field-cards">2</td>' in content and '<td class="field-blocked_cards">1</td>' in content


@pytest.mark.parametrize("model", ["customer", "card", "transaction"])
def test_money_data_is_not_edited_added_or_deleted_from_the_admin(admin_client, john, model):
    instance = {"customer": john, "card": john.cards.first(), "transaction": john.transactions.first()}[model]
    before = {field: getattr(instance, field) for field in ("balance", "status", "amount") if hasattr(instance, field)}

    added = admin_client.get(f"/admin/bank/{model}/add/")
    deleted = admin_client.post(f"/admin/bank/{model}/{instance.pk}/delete/", {"post": "yes"})
    form = {"balance": "1000000", "status": "blocked", "amount": "1000000", "name": "John"}
    admin_client.post(f"/admin/bank/{model}/{instance.pk}/change/", form)

    assert (added.status_code, deleted.status_code) == (403, 403)
    instance.refresh_from_db()
    assert {field: getattr(instance, field) for field in before} == before


def test_a_reviewer_browses_the_bank_data(reviewer_client, john):
    for model in ("customer", "card", "transaction"):
        assert "John" in page(reviewer_client.get(f"/admin/bank/{model}/"))
    assert "Corner Coffee" in page(reviewer_client.get(f"/admin/bank/customer/{john.pk}/change/"))
    transaction = Transaction.objects.filter(customer=john).first()
    assert reviewer_client.post(f"/admin/bank/transaction/{transaction.pk}/change/", {}).status_code == 403


# Cost


def chat_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    # As a provider's response: its usage measured, its provider named.
    return ModelResponse(
        parts=[TextPart("Hello!")], usage=RequestUsage(input_tokens=1000, output_tokens=500), provider_name="openai"
    )


def ask_chat(thread: Thread) -> Message:
    turn = async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query="Hi")
    return Message.objects.get(pk=turn.assistant_message.pk)


def test_an_answer_saves_its_price_for_a_model_genai_prices_knows(admin_client, make_thread, settings):
    settings.AGENT_MODEL = FunctionModel(chat_answer, model_name="gpt-4o")
    thread = make_thread(agent_type="general_chat")

    answer = ask_chat(thread)

    usage = RequestUsage(input_tokens=1000, output_tokens=500)
    expected = ModelResponse(parts=[], usage=usage, model_name="gpt-4o", provider_name="openai").cost().total_price
    assert expected == calc_price(usage, "gpt-4o", provider_id="openai").total_price == Decimal("0.0075")
    assert answer.metadata["cost"] == "0.0075"
    assert answer.metadata["usage"]["total_tokens"] == 1500
    assert "cost $0.0075" in page(admin_client.get(f"{THREADS}{thread.pk}/change/"))


@pytest.mark.parametrize("model_name", [None, "demo"])
def test_an_answer_of_a_model_without_a_price_saves_none_and_reads_unknown(
    admin_client, make_thread, settings, model_name
):
    settings.AGENT_MODEL = FunctionModel(chat_answer, model_name=model_name)
    thread = make_thread(agent_type="general_chat")

    answer = ask_chat(thread)

    assert answer.metadata["cost"] is None
    assert answer.metadata["usage"]["total_tokens"] == 1500
    assert "cost unknown" in page(admin_client.get(f"{THREADS}{thread.pk}/change/"))


@pytest.mark.parametrize(
    ("cost", "before", "saved"),
    [
        (None, {}, None),
        (Decimal("0.0075"), {}, "0.0075"),
        (Decimal("0.00000075"), {}, "0.00000075"),  # not "7.5E-7"
        (Decimal("0.0075"), {"usage": {"total_tokens": 10}, "cost": "0.0025"}, "0.0100"),
        (None, {"usage": {"total_tokens": 10}, "cost": "0.0025"}, None),
        (Decimal("0.0075"), {"usage": {"total_tokens": 10}, "cost": None}, None),
    ],
)
def test_the_cost_adds_up_across_an_approval_and_is_unknown_when_any_of_it_is(cost, before, saved):
    assert cost_metadata(cost, before) == saved
