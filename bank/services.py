"""Writes to the bank's data, as the agents' tools make them."""

from dataclasses import dataclass

from django.utils import timezone

from bank.models import Card


@dataclass(frozen=True)
class Blocked:
    last4: str
    already: bool
    """It had been blocked before: nothing changed."""


class NoSuchCard(Exception):
    """The customer has no card to block by that description."""


def card_block(*, customer_id: int, last4: str | None) -> Blocked:
    """Block the customer's card ending in `last4`, or their only active card when `last4` is not given. The
    write is conditional, so blocking a card twice, or at once from two places, blocks it once."""
    cards = Card.objects.filter(customer_id=customer_id)
    cards = cards.filter(last4=last4) if last4 else cards.filter(status=Card.Status.ACTIVE)
    found = list(cards.values_list("pk", "last4")[:2])
    if len(found) != 1:
        raise NoSuchCard("Several active cards: say which one." if found else "No such card.")
    card_id, card_last4 = found[0]
    changed = Card.objects.filter(pk=card_id, status=Card.Status.ACTIVE).update(
        status=Card.Status.BLOCKED, blocked_at=timezone.now()
    )
    return Blocked(last4=card_last4, already=not changed)
