"""Reads of the bank's data, as the agents' tools need them."""

import uuid

from bank.models import Customer, Transaction
from bankagent.jsontypes import JSONObject


def customer_for_user(*, user_id: uuid.UUID) -> Customer | None:
    return Customer.objects.filter(user_id=user_id).first()


def recent_transactions_of(*, customer_id: int, limit: int) -> list[JSONObject]:
    """The customer's latest card transactions, newest first."""
    rows = Transaction.objects.filter(customer_id=customer_id).select_related("card")[:limit]
    return [
        {
            "date": row.created_at.date().isoformat(),
            "description": row.description,
            "amount": float(row.amount),
            "card": row.card.last4 if row.card else None,
            "pending": row.pending,
        }
        for row in rows
    ]
