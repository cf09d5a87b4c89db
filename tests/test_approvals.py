"""The customer's approval before their card is blocked (runs.approvals): the run that stops for it, the decision
over REST and over the websocket, the answer that goes on after it, and what an expired approval does.

The offline demo model drives it: "I lost my card" calls the bank support agent's block_card tool, which needs the
customer's approval; its answer then says what the decision did.
"""

import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from bank.models import Card
from runs import runner
from runs.selectors import answers_with_lapsed_approvals
from tests.test_resume import TIMEOUT, ended, opened, until
from threads.models import Approval, Message, Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runs_end_with_the_test")]

LOST = "I lost my card"


@pytest.fixture
def key(transactional_db) -> str:
    from identity.models import APIKey

    return APIKey.objects.create_key(name="approval tests")[1]


@pytest.fixture
def thread(demo_customer, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="bank_support")


def card() -> Card:
    return Card.objects.get(customer__user_id__isnull=False, last4="4242")


def ask(client, thread: Thread, query: str = LOST):
    return client.post("/api/v1/agent/query", {"thread_id": str(thread.pk), "query": query}, format="json")


def decide(client, thread: Thread, approval_id: object, body: dict):
    return client.post(f"/api/v1/threads/{thread.pk}/approvals/{approval_id}", body, format="json")


# Over REST


def test_a_blocking_query_that_stops_for_approval_answers_awaiting_approval_and_blocks_nothing(client, thread):
    response = ask(client, thread)

    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["output"], body["response"]) == ("awaiting_approval", None, "")
    approval = body["approval"]
    assert (approval["tool"], approval["args"]) == ("block_card", {})
    expires = timezone.datetime.fromisoformat(approval["expires_at"])
    assert timedelta(minutes=14) < expires - timezone.now() <= timedelta(minutes=15)
    assert card().status == "active"
    messages = client.get(f"/api/v1/threads/{thread.pk}/messages").json()
    assert messages[-1]["approval"] == approval and messages[-1]["status"] == "awaiting_approval"
    assert messages[-1]["tool_calls"] == [
        {"name": "block_card", "args": {}, "result": None, "outcome": "pending", "duration_ms": None}
    ]
    assert messages[0]["approval"] is None


def test_a_question_while_an_approval_is_pending_is_409_approval_pending_and_writes_nothing(client, thread):
    ask(client, thread)

    response = ask(client, thread, "What is my balance?")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "approval_pending"
    assert Message.objects.filter(thread=thread).count() == 2


@pytest.mark.parametrize(("approved", "status", "blocked"), [(True, "approved", True), (False, "denied", False)])
def test_a_decision_answers_with_the_answer_gone_on_and_the_card_as_decided(client, thread, approved, status, blocked):
    approval = ask(client, thread).json()["approval"]

    response = decide(client, thread, approval["id"], {"approved": approved, "note": "It was in my coat."})

    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["output"]["block_card"], body["approval"]) == ("complete", blocked, None)
    assert (card().status == "blocked", card().blocked_at is not None) == (blocked, blocked)
    saved = Approval.objects.get(pk=approval["id"])
    assert (saved.status, saved.decided_at is not None) == (status, True)
    answer = Message.objects.get(pk=body["message_id"])
    assert [call["outcome"] for call in answer.tool_calls] == ["success" if approved else "denied"]
    assert answer.tool_calls[0]["duration_ms"] is None or answer.tool_calls[0]["duration_ms"] >= 0
    # The thread takes questions again, and its history replays the exchange, the deferred call included.
    again = ask(client, thread, "What is my balance?")
    assert again.status_code == 200, again.json()
    parts = [part["part_kind"] for message in answer.model_messages for part in message["parts"]]
    assert parts.count("tool-call") >= 2 and "tool-return" in parts


def test_a_second_decision_is_409_approval_decided_and_changes_nothing(client, thread):
    approval = ask(client, thread).json()["approval"]
    decide(client, thread, approval["id"], {"approved": False})

    response = decide(client, thread, approval["id"], {"approved": True})

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "approval_decided"
    assert card().status == "active"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"approved": "yes"}, 422, "validation_error"),
        ({"approved": 1}, 422, "validation_error"),
        ({}, 422, "validation_error"),
        ({"approved": True, "note": "x" * 1001}, 422, "validation_error"),
        ({"approved": True, "note": "a\x00b"}, 400, "invalid_text"),
    ],
)
def test_a_malformed_decision_is_refused_and_decides_nothing(client, thread, body, status, code):
    approval = ask(client, thread).json()["approval"]

    response = decide(client, thread, approval["id"], body)

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert Approval.objects.get(pk=approval["id"]).status == "pending"


def test_only_the_threads_owner_decides_and_an_unknown_approval_is_404(client, thread, api_key, other_user_id):
    approval = ask(client, thread).json()["approval"]
    from rest_framework.test import APIClient

    stranger = APIClient()
    stranger.credentials(HTTP_X_API_KEY=api_key, HTTP_X_USER_ID=str(other_user_id))

    refused = [
        decide(stranger, thread, approval["id"], {"approved": True}),
        decide(client, thread, "not-an-id", {"approved": True}),
        decide(client, thread, "00000000-0000-4000-8000-000000000000", {"approved": True}),
    ]

    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(404, "not_found")] * 3
    assert Approval.objects.get(pk=approval["id"]).status == "pending"


# Over the websocket


async def test_a_decision_over_the_websocket_streams_the_answer_to_every_socket_and_seq_goes_on(thread, key):
    asker, watcher = await opened(thread, key), await opened(thread, key)
    await asker.send_json_to({"type": "query", "query": LOST})
    stopped = await until(asker, ended)
    await until(watcher, ended)
    required = next(event for event in stopped if event["event"] == "approval_required")

    await watcher.send_json_to({"type": "approval", "approval_id": required["approval"]["id"], "approved": True})
    went_on = await until(asker, ended)
    watched = await until(watcher, ended)
    await watcher.send_json_to({"type": "approval", "approval_id": required["approval"]["id"], "approved": False})
    twice = await watcher.receive_json_from(timeout=TIMEOUT)
    await asker.disconnect()
    await watcher.disconnect()

    names = [event["event"] for event in stopped]
    assert names[-3:] == ["approval_required", "message_complete", "done"]
    assert stopped[-2]["status"] == "awaiting_approval"
    assert went_on[0] == {
        "event": "approval_decided",
        "approval": {"id": required["approval"]["id"], "tool": "block_card", "status": "approved"},
        "message_id": required["message_id"],
        "seq": stopped[-1]["seq"] + 1,
    }
    assert [event["event"] for event in went_on[1:4]] == ["message_started", "tool_call", "tool_result"]
    assert went_on[-2]["status"] == "complete" and went_on[-2]["output"]["block_card"] is True
    assert [event["seq"] for event in stopped + went_on] == sorted({event["seq"] for event in stopped + went_on})
    assert watched[-2] == went_on[-2]
    assert (twice["event"], twice["error_type"]) == ("error", "approval_decided")
    assert await sync_to_async(lambda: card().status)() == "blocked"


# Expiry


async def expire(approval_id: str) -> None:
    await Approval.objects.filter(pk=approval_id).aupdate(expires_at=timezone.now() - timedelta(seconds=1))


async def test_a_decision_after_expiry_is_410_and_the_answer_goes_on_as_if_denied(thread, key):
    ws = await opened(thread, key)
    await ws.send_json_to({"type": "query", "query": LOST})
    stopped = await until(ws, ended)
    approval_id = next(e for e in stopped if e["event"] == "approval_required")["approval"]["id"]
    await expire(approval_id)

    await ws.send_json_to({"type": "approval", "approval_id": approval_id, "approved": True, "request_id": "late"})
    heard = await until(ws, lambda events: ended(events) and any(e["event"] == "error" for e in events))
    await ws.disconnect()

    refusal = next(event for event in heard if event["event"] == "error")
    assert (refusal["error_type"], refusal["request_id"]) == ("approval_expired", "late")
    decided = next(event for event in heard if event["event"] == "approval_decided")
    assert decided["approval"]["status"] == "expired"
    complete = next(event for event in heard if event["event"] == "message_complete")
    assert complete["output"]["block_card"] is False
    assert "did not answer my request to block your card in time" in complete["output"]["support_advice"]
    assert await sync_to_async(lambda: card().status)() == "active"


async def test_a_question_after_an_approval_expired_is_409_while_the_answer_before_is_finished(thread, key):
    ws = await opened(thread, key)
    await ws.send_json_to({"type": "query", "query": LOST})
    stopped = await until(ws, ended)
    await expire(next(e for e in stopped if e["event"] == "approval_required")["approval"]["id"])

    await ws.send_json_to({"type": "query", "query": "What is my balance?", "request_id": "next"})
    heard = await until(ws, lambda events: ended(events) and any(e["event"] == "error" for e in events))
    refusal = next(event for event in heard if event["event"] == "error")
    await ws.send_json_to({"type": "query", "query": "What is my balance?"})
    answered = await until(ws, ended)
    await ws.disconnect()

    assert (refusal["error_type"], refusal["request_id"]) == ("thread_busy", "next")
    finished = next(event for event in heard if event["event"] == "message_complete")
    assert finished["message_id"] == stopped[-1]["message_id"] and finished["status"] == "complete"
    assert answered[-2]["status"] == "complete" and "$1,123.45" in answered[-2]["output"]["support_advice"]


async def test_the_sweep_finds_answers_whose_approvals_all_expired_and_they_go_on(thread, key):
    ws = await opened(thread, key)
    await ws.send_json_to({"type": "query", "query": LOST})
    stopped = await until(ws, ended)
    approval_id = next(e for e in stopped if e["event"] == "approval_required")["approval"]["id"]
    assert await sync_to_async(answers_with_lapsed_approvals)(now=timezone.now()) == []
    await expire(approval_id)

    (lapsed,) = await sync_to_async(answers_with_lapsed_approvals)(now=timezone.now())
    runner.finish_lapsed(*lapsed)
    runner.finish_lapsed(*lapsed)  # a second sweep (another process) finds nothing left to do
    went_on = await until(ws, ended)
    await ws.disconnect()

    assert lapsed == (thread.pk, uuid.UUID(stopped[-1]["message_id"]))
    assert went_on[0]["approval"]["status"] == "expired" and went_on[-2]["status"] == "complete"
    assert [event["event"] for event in went_on].count("done") == 1
    answer = await Message.objects.aget(pk=stopped[-1]["message_id"])
    assert answer.status == "complete" and answer.output["block_card"] is False
