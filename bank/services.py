"""Writes to the bank's data, as the agents' tools make them."""

from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from audit.trail import record
from bank.models import Card


@dataclass(frozen=True)
class Blocked:
    last4: str
    already: bool
    """It had been blocked before: nothing changed."""


class NoSuchCard(Exception):
    """The customer has no card to block by that description."""


@transaction.atomic
def card_block(*, customer_id: int, last4: str | None) -> Blocked:
    """Block the customer's card ending in `last4`, or their only active card when `last4` is not given. The
    write is conditional, so blocking a card twice, or at once from two places, blocks it once (and is recorded
    in the audit trail once, with it)."""
    cards = Card.objects.filter(customer_id=customer_id)
    cards = cards.filter(last4=last4) if last4 else cards.filter(status=Card.Status.ACTIVE)
    found = list(cards[:2])
    if len(found) != 1:
        raise NoSuchCard("Several active cards: say which one." if found else "No such card.")
    card, now = found[0], timezone.now()
    changed = Card.objects.filter(pk=card.pk, status=Card.Status.ACTIVE).update(
        status=Card.Status.BLOCKED, blocked_at=now
    )
    if changed:
        changes = {"status": (Card.Status.ACTIVE, Card.Status.BLOCKED), "blocked_at": (card.blocked_at, now)}
        card.status, card.blocked_at = Card.Status.BLOCKED, now
        record(card, "card.blocked", changes)
    return Blocked(last4=card.last4, already=not changed)
