"""The bank's support agent: structured advice, with the customer's balance and transactions as tools."""

import uuid
from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field, with_config
from pydantic_ai import Agent, ModelRetry, RunContext, ToolFailed, ToolOutput
from typing_extensions import TypedDict

from bank.models import Customer
from bank.selectors import customer_for_user, recent_transactions_of
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
    """Whether to block the customer's card."""
    risk_level: Annotated[int, Field(ge=0, le=10)]
    """Risk level of the query, from 0 (none) to 10 (severe)."""
    follow_up_actions: list[str]
    """Next steps the customer or the bank should take."""


REQUIRED_FIELDS = frozenset(SupportOutput.__annotations__)

support_agent = Agent(
    deps_type=SupportDependencies,
    output_type=ToolOutput(SupportOutput, name="final_result"),
    name="bank_support",
    instructions=(
        "You are a support agent in our bank: give the customer support and judge the risk level of their query. "
        "Reply using the customer's name."
    ),
)


@support_agent.instructions
async def add_customer_name(ctx: RunContext[SupportDependencies]) -> str:
    if ctx.deps.customer is None:
        return "This user has no account with the bank: you cannot look up balances or transactions for them."
    return f"The customer's name is {ctx.deps.customer.name!r}."


@support_agent.output_validator
async def require_complete(ctx: RunContext[SupportDependencies], output: SupportOutput) -> SupportOutput:
    if ctx.partial_output:
        return output
    missing = sorted(REQUIRED_FIELDS - output.keys())
    if missing:
        raise ModelRetry(f"The answer is missing: {', '.join(missing)}.")
    return output


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


def support_deps(user_id: uuid.UUID) -> SupportDependencies:
    return SupportDependencies(user_id=user_id, customer=customer_for_user(user_id=user_id))
