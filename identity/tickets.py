"""Single-use, short-lived websocket tickets for browsers, which cannot set headers on a websocket."""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone


@dataclass(frozen=True)
class Ticket:
    api_key_id: str | None
    user_id: uuid.UUID
    thread_id: uuid.UUID


def _cache_key(raw: str) -> str:
    # Only a hash of the ticket is stored: the cache never holds a usable credential.
    return "ws-ticket:" + hashlib.sha256(raw.encode()).hexdigest()


def ticket_issue(*, api_key_id: str | None, user_id: uuid.UUID, thread_id: uuid.UUID) -> tuple[str, datetime]:
    raw = secrets.token_urlsafe(32)
    lifetime = settings.WS_TICKET_SECONDS
    cache.set(_cache_key(raw), Ticket(api_key_id=api_key_id, user_id=user_id, thread_id=thread_id), lifetime)
    return raw, timezone.now() + timedelta(seconds=lifetime)


def ticket_redeem(raw: str) -> Ticket | None:
    """The ticket's grant, once: whoever deletes it first wins, so a replay finds nothing."""
    key = _cache_key(raw)
    ticket = cache.get(key)
    if ticket is None or not cache.delete(key):
        return None
    return ticket
