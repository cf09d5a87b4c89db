"""The bank's support agent: structured advice, with the customer's balance and transactions as tools, and card
blocking, which waits for the customer's approval."""

import uuid
from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field, with_config
from pydantic_ai import Agent, ModelRetry, RunContext, ToolFailed, ToolOutput
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.tools import DeferredToolRequests
from typing_extensions import TypedDict

from agents.summary import EarlierSummary
from bank.models import Customer
from bank.selectors import customer_for_user, recent_transactions_of
from bank.services import NoSuchCard, card_block
from bankagent.db import db
from bankagent.jsontypes import JSONObject


@dataclass
class SupportDependencies:
    user_id: uuid.UUID
    customer: Customer | None
    """Read in the transaction that started the run: its balance is the balance as the question was asked."""


# total=False lets a partial answer validate while it streams, holding only the fields the model has
# produced so far; `require_complete` checks the final answer whole.
@with_config(ConfigDict(use_attribute_docstrings=True))
class SupportOutput(TypedDict, total=False):
    support_advice: str
    """Advice returned to the customer."""
    block_card: bool
    """Whether the customer's card was blocked in this exchange (set from what the block_card tool did)."""
    risk_level: Annotated[int, Field(ge=0, le=10)]
    """Risk level of the query, from 0 (none) to 10 (severe)."""
    follow_up_actions: list[str]
    """Next steps the customer or the bank should take."""


REQUIRED_FIELDS = frozenset(SupportOutput.__annotations__)

BLOCK_CARD = "block_card"
OUTPUT_TOOL = "final_result"

support_agent = Agent(
    deps_type=SupportDependencies,
    # A call of a tool that needs the customer's approval stops the run with the calls it waits for.
    output_type=[ToolOutput(SupportOutput, name=OUTPUT_TOOL), DeferredToolRequests],
    name="bank_support",
    # The thread's summary of what left the history window, ahead of the exchanges replayed.
    capabilities=[EarlierSummary()],
    instructions=(
        "You are a support agent in our bank: give the customer support and judge the risk level of their query. "
        "Reply using the customer's name. When a card is lost, stolen or used by someone else, block it with the "
        "block_card tool: the customer is asked to approve first, and may refuse."
    ),
)


@support_agent.instructions
async def add_customer_name(ctx: RunContext[SupportDependencies]) -> str:
    if ctx.deps.customer is None:
        return "This user has no account with the bank: you cannot look up balances or transactions for them."
    return f"The customer's name is {ctx.deps.customer.name!r}."


@support_agent.output_validator
async def require_complete(
    ctx: RunContext[SupportDependencies], output: SupportOutput | DeferredToolRequests
) -> SupportOutput | DeferredToolRequests:
    if ctx.partial_output or isinstance(output, DeferredToolRequests):
        return output
    missing = sorted(REQUIRED_FIELDS - output.keys())
    if missing:
        raise ModelRetry(f"The answer is missing: {', '.join(missing)}.")
    # What the answer says of the card is what happened to it, whatever the model wrote.
    return {**output, "block_card": card_blocked(ctx.messages)}


def card_blocked(messages: list[ModelMessage]) -> bool:
    """Whether block_card ran, and blocked the card, since the customer's latest question."""
    for message in reversed(messages):
        if not isinstance(message, ModelRequest):
            continue
        for part in message.parts:
            if isinstance(part, ToolReturnPart) and part.tool_name == BLOCK_CARD and part.outcome == "success":
                return True
        if any(isinstance(part, UserPromptPart) for part in message.parts):
            return False
    return False


def _customer(ctx: RunContext[SupportDependencies]) -> Customer:
    if ctx.deps.customer is None:
        raise ToolFailed("No bank account is linked to this user.")
    return ctx.deps.customer


@support_agent.tool
async def customer_balance(ctx: RunContext[SupportDependencies], include_pending: bool) -> float:
    """Returns the customer's current account balance."""
    customer = _customer(ctx)
    balance = customer.balance + customer.pending if include_pending else customer.balance
    return float(balance)


@support_agent.tool
async def recent_transactions(ctx: RunContext[SupportDependencies], limit: int = 5) -> list[JSONObject]:
    """Returns the customer's most recent card transactions, newest first."""
    return await db(recent_transactions_of)(customer_id=_customer(ctx).pk, limit=max(1, min(limit, 20)))


@support_agent.tool(requires_approval=True)
async def block_card(ctx: RunContext[SupportDependencies], last4: str | None = None) -> str:
    """Blocks the customer's card ending in last4 (their only active card if not given); needs their approval."""
    try:
        blocked = await db(card_block)(customer_id=_customer(ctx).pk, last4=last4)
    except NoSuchCard as exc:
        raise ToolFailed(str(exc)) from exc
    return f"The card ending in {blocked.last4} {'was already' if blocked.already else 'is now'} blocked."


def support_deps(user_id: uuid.UUID) -> SupportDependencies:
    return SupportDependencies(user_id=user_id, customer=customer_for_user(user_id=user_id))
