"""Who a request acts for: an API key holder and the end user it names, or a signed-in user of the chat page."""

import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar
from urllib.parse import parse_qs

from django.conf import settings
from django.utils import timezone
from rest_framework import exceptions as drf
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.request import Request

from bankagent.db import db
from bankagent.exceptions import AuthenticationFailed, CsrfFailed, InvalidUserId
from identity.models import APIKey
from identity.services import profile_user_id
from identity.tickets import ticket_redeem


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the end user, vouched for by an API key holder."""

    user_id: uuid.UUID
    api_key_id: str | None = None
    """None for a signed-in user of the chat page."""
    events: str = "standard"
    """The event dialect of the key's streams (`APIKey.Events`); a signed-in user gets the standard one."""
    is_authenticated: bool = True


def parse_user_id(raw: str | None) -> uuid.UUID:
    """Any spelling `uuid.UUID` accepts names the same user."""
    if not raw:
        raise InvalidUserId("The X-User-ID header is required.")
    try:
        return uuid.UUID(raw.strip())
    except ValueError as exc:
        raise InvalidUserId() from exc


def _unexpired(key: APIKey | None) -> APIKey | None:
    return None if key is None or key.has_expired else key


@dataclass(frozen=True)
class Standing:
    """Credentials found good, until their expiry if they have one (an API key's)."""

    expiry: datetime | None

    def in_force(self) -> bool:
        """Expiry is checked on every use; revocation only when the credentials are looked up again."""
        return self.expiry is None or self.expiry > timezone.now()


@dataclass(frozen=True)
class KeyGrant(Standing):
    """What a verified key grants, remembered for API_KEY_CACHE_SECONDS."""

    key_id: str
    events: str

    @classmethod
    def of(cls, key: APIKey) -> "KeyGrant":
        return cls(key_id=key.pk, events=key.events, expiry=key.expiry_date)


def _lately(checked_at: float) -> bool:
    return time.monotonic() - checked_at < settings.API_KEY_CACHE_SECONDS


_RECENT_MAX = 10_000
E = TypeVar("E")


def _remember(entries: dict[str, E], name: str, entry: E) -> None:
    """Store `entry` as the most recently used; the least recently used go first, so that a flood of names
    (unknown keys) cannot flush the ones in use."""
    entries.pop(name, None)
    if len(entries) >= _RECENT_MAX:
        for stale in list(itertools.islice(entries, _RECENT_MAX // 10)):
            entries.pop(stale, None)
    entries[name] = entry


# Verified keys (and refused ones) by the SHA-256 of the key, never the key itself: verifying costs a query and a
# hash, so a key is looked up again only after API_KEY_CACHE_SECONDS, which bounds how long a revoked key works.
_recent: dict[str, tuple[float, KeyGrant | None]] = {}


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.strip().encode("utf-8", "surrogatepass")).hexdigest()


def _fresh(digest: str) -> tuple[float, KeyGrant | None] | None:
    entry = _recent.get(digest)
    return entry if entry is not None and _lately(entry[0]) else None


def _key_verdict(raw: str) -> tuple[float, KeyGrant | None]:
    """When the key `raw` was last looked up, and what it granted then (None: unknown, revoked or expired)."""
    digest = _digest(raw)
    if (entry := _fresh(digest)) is None:
        checked_at, key = time.monotonic(), api_key_from(raw)
        entry = (checked_at, None if key is None else KeyGrant.of(key))
    _remember(_recent, digest, entry)
    return entry


def key_grant(raw: str | None) -> KeyGrant | None:
    """What the key `raw` grants now, or None: unknown, revoked or expired. The hash comparison runs in constant
    time; expiry is checked on every use, revocation once per API_KEY_CACHE_SECONDS."""
    if not raw:
        return None
    grant = _key_verdict(raw)[1]
    return grant if grant is not None and grant.in_force() else None


def credentials_cached(request: Request) -> bool:
    """Whether authenticating `request` needs no database: its API key was verified lately."""
    raw = request.headers.get("X-API-Key")
    return bool(raw) and _fresh(_digest(raw)) is not None


def api_key_from(raw: str | None) -> APIKey | None:
    """The usable key matching `raw`, or None."""
    if not raw:
        return None
    try:
        return _unexpired(APIKey.objects.get_from_key(raw.strip()))
    except APIKey.DoesNotExist:
        return None


class APIKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, KeyGrant] | None:
        raw_key = request.headers.get("X-API-Key")
        if raw_key is None:
            return None
        grant = key_grant(raw_key)
        if grant is None:
            raise AuthenticationFailed()
        user_id = parse_user_id(request.headers.get("X-User-ID"))
        return Principal(user_id=user_id, api_key_id=grant.key_id, events=grant.events), grant

    def authenticate_header(self, request: Request) -> str:
        return "X-API-Key"


class SessionUserAuthentication(SessionAuthentication):
    """The chat page's calls: the Django session's user, acting as its profile's end user. CSRF is enforced."""

    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        user = getattr(request._request, "user", None)
        if not _signed_in(user):
            return None
        self.enforce_csrf(request)  # before the profile lookup, which may write: a refused request writes nothing
        return Principal(user_id=profile_user_id(user=user)), None

    def enforce_csrf(self, request: Request) -> None:
        try:
            super().enforce_csrf(request)
        except drf.PermissionDenied as exc:
            raise CsrfFailed() from exc


def _signed_in(user: object) -> bool:
    """An active user of the session (AnonymousUser and a missing user are not)."""
    return bool(getattr(user, "is_active", False))


def _session_user_id(user: object) -> uuid.UUID | None:
    return profile_user_id(user=user) if _signed_in(user) else None


def _usable_key(api_key_id: str | None) -> APIKey | None:
    return _unexpired(APIKey.objects.get_usable_keys().filter(pk=api_key_id).first())


# Keys of open sockets found usable, by id, and when.
_open_keys: dict[str, tuple[float, KeyGrant]] = {}


async def key_still_usable(api_key_id: str) -> bool:
    """Whether a socket's key may still start runs: a revoked key stops within API_KEY_CACHE_SECONDS, an
    expired one at once, as over HTTP."""
    entry = _open_keys.get(api_key_id)
    if entry is None or not _lately(entry[0]):
        key = await db(_usable_key)(api_key_id)
        if key is None:
            _open_keys.pop(api_key_id, None)
            return False
        entry = _open_keys[api_key_id] = (time.monotonic(), KeyGrant.of(key))
    return entry[1].in_force()


async def authenticate_socket(scope: dict, thread_id: uuid.UUID) -> Principal | None:
    """Who a websocket handshake acts for: a single-use ticket for this thread, the API headers, or the session.

    The session needs no CSRF token here: browsers always send Origin, which must name one of our hosts.
    """
    headers = {name.decode("latin1").lower(): value.decode("latin1") for name, value in scope.get("headers", [])}
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if tickets:
        ticket = await db(ticket_redeem)(tickets[0])
        if ticket is None or ticket.thread_id != thread_id:
            return None
        # The ticket stands for its key as the key is now: revoking the key revokes the ticket too.
        key = await db(_usable_key)(ticket.api_key_id)
        if key is None:
            return None
        return Principal(user_id=ticket.user_id, api_key_id=ticket.api_key_id, events=key.events)
    if "x-api-key" not in headers:
        user_id = await db(_session_user_id)(scope.get("user"))
        return None if user_id is None else Principal(user_id=user_id)
    grant = await db(key_grant)(headers.get("x-api-key"))
    if grant is None:
        return None
    try:
        return Principal(user_id=parse_user_id(headers.get("x-user-id")), api_key_id=grant.key_id, events=grant.events)
    except InvalidUserId:
        return None
