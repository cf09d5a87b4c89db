"""The offline demo model, through the real agents, tools and database."""

import json

import pytest
from asgiref.sync import async_to_sync
from pydantic_ai.messages import ToolCallPart

from agents.bank_support import support_agent, support_deps
from agents.demo import build_demo_model
from bank.models import Card
from runs.runner import decide_blocking, run_blocking
from threads.models import Message


def ask(thread, query) -> Message:
    turn = async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query=query)
    return Message.objects.get(pk=turn.assistant_message.pk)


def tool_calls(message: Message) -> list[str]:
    return [p["tool_name"] for m in message.model_messages for p in m["parts"] if p["part_kind"] == "tool-call"]


def test_balance_question_calls_the_balance_tool_and_quotes_the_figure(make_thread):
    answer = ask(make_thread(), "What is my balance?")
    assert "customer_balance" in tool_calls(answer)
    assert "$1,123.45" in answer.output["support_advice"]
    assert "John" in answer.output["support_advice"]
    assert answer.output["block_card"] is False


def test_transactions_question_lists_real_transactions(make_thread):
    answer = ask(make_thread(), "Show me my recent transactions")
    assert "recent_transactions" in tool_calls(answer)
    assert "City Grocery" in answer.output["support_advice"]


@pytest.mark.parametrize(
    ("approved", "blocked", "says"),
    [(True, True, "is now blocked"), (False, False, "I have not blocked your card")],
    ids=["approved", "denied"],
)
def test_lost_card_asks_to_block_it_and_the_answer_says_what_the_decision_did(make_thread, approved, blocked, says):
    thread = make_thread()
    waiting = ask(thread, "I lost my card")
    approval = waiting.approvals.get()
    assert (waiting.status, waiting.output, approval.tool_name, approval.status) == (
        "awaiting_approval",
        None,
        "block_card",
        "pending",
    )
    card = Card.objects.get(customer__user_id=thread.user_id)
    assert card.status == "active"

    turn = async_to_sync(decide_blocking)(
        user_id=thread.user_id, thread_id=thread.pk, approval_id=approval.pk, approved=approved, note=""
    )

    answer = Message.objects.get(pk=turn.assistant_message.pk)
    card.refresh_from_db()
    assert answer.pk == waiting.pk and answer.status == "complete"
    assert answer.output["block_card"] is blocked
    assert says in answer.output["support_advice"]
    assert (card.status == "blocked", card.blocked_at is not None) == (blocked, blocked)
    assert answer.output["risk_level"] >= 6


def test_user_without_account_gets_a_clear_answer(make_thread, other_user_id):
    answer = ask(make_thread(user=other_user_id), "What is my balance?")
    assert answer.status == "complete"
    assert "couldn't find a bank account" in answer.output["support_advice"]


@pytest.mark.parametrize("agent_type", ["bank_support", "general_chat"])
def test_name_told_earlier_is_recalled_from_history(make_thread, agent_type):
    thread = make_thread(agent_type=agent_type)
    ask(thread, "Hi, my name is Alice")
    answer = ask(thread, "What is my name?")
    text = answer.output["support_advice"] if answer.output else answer.content
    assert "Alice" in text


def test_poem_request_gets_a_long_answer(make_thread):
    answer = ask(make_thread(agent_type="general_chat"), "Write me a poem about money")
    assert answer.output is None
    assert len(answer.content) > 400
    assert answer.content.count("\n") >= 8


def test_structured_answer_streams_in_growing_valid_chunks(db, user_id):
    deps = support_deps(user_id)

    async def stream() -> list[dict]:
        model = build_demo_model(delay_ms=0)
        async with support_agent.run_stream("Show me my recent transactions", deps=deps, model=model) as result:
            return [partial async for partial in result.stream_output(debounce_by=None)]

    partials = async_to_sync(stream)()
    assert len(partials) > 5
    advice_lengths = [len(p.get("support_advice", "")) for p in partials]
    assert advice_lengths == sorted(advice_lengths)
    assert partials[-1]["block_card"] is False
    # Before the model wrote block_card, no partial shows a default for it.
    assert "block_card" not in partials[0]
    json.dumps(partials)


def test_demo_model_reads_tool_results_from_the_request(db, user_id):
    deps = support_deps(user_id)

    async def run():
        return await support_agent.run("balance please", deps=deps, model=build_demo_model(delay_ms=0))

    result = async_to_sync(run)()
    calls = [p for m in result.new_messages() for p in m.parts if isinstance(p, ToolCallPart)]
    assert [call.tool_name for call in calls] == ["customer_balance", "final_result"]
    assert "$1,123.45" in result.output["support_advice"]
