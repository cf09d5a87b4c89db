"""Who a request acts for: an API key holder and the end user it names, or a signed-in user of the chat page."""

import asyncio
import hashlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from importlib import import_module
from typing import ClassVar, TypedDict, TypeGuard, TypeVar
from urllib.parse import parse_qs

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.base import SessionBase
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from rest_framework import exceptions as drf
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.request import Request

from bankagent import context
from bankagent.db import db
from bankagent.exceptions import AuthenticationFailed, CsrfFailed, InvalidUserId
from identity.models import APIKey, Profile
from identity.services import profile_user_id
from identity.tickets import ticket_redeem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the end user, vouched for by an API key holder."""

    user_id: uuid.UUID
    api_key_id: str | None = None
    """None for a signed-in user of the chat page."""
    events: str = "standard"
    """The event dialect of the key's streams (`APIKey.Events`); a signed-in user gets the standard one."""
    is_authenticated: bool = True


def act_as(principal: Principal, login: AbstractBaseUser | None = None) -> None:
    """Name who acts for the rest of the request or socket, for the audit trail: a key by its prefix alone."""
    if principal.api_key_id is not None:
        prefix = principal.api_key_id.partition(".")[0]  # a key's id is its prefix, a dot and its hash
        who = context.Actor(kind="api_key", name=prefix, user_id=str(principal.user_id))
    elif login is not None:
        who = context.Actor(kind="login", name=login.get_username(), user_id=str(principal.user_id), login_id=login.pk)
    else:
        return
    context.actor.set(who)


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
        principal = Principal(user_id=user_id, api_key_id=grant.key_id, events=grant.events)
        act_as(principal)
        return principal, grant

    def authenticate_header(self, request: Request) -> str:
        return "X-API-Key"


class SessionUserAuthentication(SessionAuthentication):
    """The chat page's calls: the Django session's user, acting as its profile's end user. CSRF is enforced."""

    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        user = getattr(request._request, "user", None)
        if not _signed_in(user):
            return None
        self.enforce_csrf(request)  # before the profile lookup, which may write: a refused request writes nothing
        principal = Principal(user_id=profile_user_id(user=user))
        act_as(principal, user)
        return principal, None

    def enforce_csrf(self, request: Request) -> None:
        try:
            super().enforce_csrf(request)
        except drf.PermissionDenied as exc:
            raise CsrfFailed() from exc


def _signed_in(user: object) -> TypeGuard[AbstractBaseUser]:
    """An active user of the session (AnonymousUser and a missing user are not)."""
    return bool(getattr(user, "is_active", False))


def _usable_key(api_key_id: str | None) -> APIKey | None:
    return _unexpired(APIKey.objects.get_usable_keys().filter(pk=api_key_id).first())


# Open websockets: the credentials a socket was let in with are checked again before it acts and before it is sent
# events, as a key is over HTTP: a verdict stands for API_KEY_CACHE_SECONDS, an expiry applies at once.


class SocketScope(TypedDict, total=False):
    """What a websocket handshake brings (Channels' scope): its headers and query string, its session and user."""

    headers: list[tuple[bytes, bytes]]
    query_string: bytes
    session: SessionBase
    user: AbstractBaseUser | AnonymousUser


@dataclass(frozen=True)
class KeyCredential:
    """An API key, by id: named by the socket's headers, or by its ticket, which stands for its key."""

    key_id: str
    failure: ClassVar[str] = AuthenticationFailed.default_detail

    @property
    def name(self) -> str:
        return f"key:{self.key_id}"

    def look_up(self) -> Standing | None:
        key = _usable_key(self.key_id)
        return None if key is None else Standing(expiry=key.expiry_date)


@dataclass(frozen=True)
class SessionCredential:
    """A login's session in the session store, acting for the end user of the login's profile."""

    session_key: str = field(repr=False)
    login: str
    """The login's primary key, as the session stores it."""
    user_id: uuid.UUID
    failure: ClassVar[str] = "The session has ended: sign in again."

    @property
    def name(self) -> str:
        return f"session:{_digest(self.session_key)}"

    def look_up(self) -> Standing | None:
        return Standing(expiry=None) if _session_holds(self) else None


Credential = KeyCredential | SessionCredential


def _session_holds(credential: SessionCredential) -> bool:
    """Django's `get_user`, read afresh from the store: the session still names the login, whose backend is still
    configured, who is active and has not changed password (the session's auth hash, under the current secret or
    a fallback one), and who still acts for the socket's end user.

    Unlike `get_user` it writes nothing: a socket cannot send the cookie of a session moved to the current
    secret, and the browser's next page load flushes or moves the session as Django does."""
    session = import_module(settings.SESSION_ENGINE).SessionStore(credential.session_key)
    backend = session.get(BACKEND_SESSION_KEY)
    if session.get(SESSION_KEY) != credential.login or backend not in settings.AUTHENTICATION_BACKENDS:
        return False
    user = load_backend(backend).get_user(get_user_model()._meta.pk.to_python(credential.login))
    return (
        _signed_in(user)
        and _auth_hash_holds(session.get(HASH_SESSION_KEY), user)
        and Profile.objects.filter(login=user, user_id=credential.user_id).exists()
    )


def _auth_hash_holds(session_hash: str | None, user: AbstractBaseUser) -> bool:
    if not session_hash:
        return False
    known = itertools.chain([user.get_session_auth_hash()], user.get_session_auth_fallback_hash())
    return any(constant_time_compare(session_hash, auth_hash) for auth_hash in known)


Verdict = tuple[float, Standing | None]
"""When credentials were looked up (monotonic), and what was found: None when they no longer hold."""

# This process's verdicts on open sockets' credentials, by credential, and the lookups under way: the sockets
# sharing a key or a session share one lookup per API_KEY_CACHE_SECONDS, however many events they are sent.
_open: dict[str, Verdict] = {}
_lookups: dict[str, asyncio.Future[Verdict]] = {}


async def _verdict(credential: Credential) -> Verdict:
    name = credential.name
    if (entry := _open.get(name)) is not None and _lately(entry[0]):
        return entry
    lookup = _lookups.get(name)
    if lookup is None or lookup.get_loop() is not asyncio.get_running_loop():
        lookup = _lookups[name] = asyncio.ensure_future(_look_up(name, credential))
        lookup.add_done_callback(partial(_lookup_done, name))
    # A socket that goes away while waiting leaves the lookup to the others.
    return await asyncio.shield(lookup)


async def _look_up(name: str, credential: Credential) -> Verdict:
    checked_at = time.monotonic()
    try:
        entry = (checked_at, await db(credential.look_up)())
    except Exception:
        logger.warning("Could not check the credentials of open sockets", exc_info=True)
        raise
    _remember(_open, name, entry)
    return entry


def _lookup_done(name: str, lookup: asyncio.Future[Verdict]) -> None:
    if _lookups.get(name) is lookup:
        del _lookups[name]
    if not lookup.cancelled():
        lookup.exception()  # a failure reaches those who wait for it; it needs no report of its own


class SocketCredentials:
    """Who an open socket acts for, and whether the credentials it was let in with still hold.

    Once they fail, they stay failed. A lookup the database cannot answer is no verdict: it raises for a frame
    that acts, and leaves the last verdict standing for events until the next try, a period later.
    """

    def __init__(self, principal: Principal, credential: Credential, standing: Standing, checked_at: float) -> None:
        self.principal = principal
        self.credential = credential
        self._standing: Standing | None = standing
        self._confirmed_at = self._tried_at = checked_at

    @property
    def failure(self) -> AuthenticationFailed:
        return AuthenticationFailed(self.credential.failure)

    def heard_lately(self) -> bool:
        """Whether events may be sent without a lookup: a clock comparison (and an expiry's, for a key with one)."""
        standing = self._standing
        return standing is not None and _lately(self._tried_at) and standing.in_force()

    async def may_act(self) -> bool:
        """Before a frame acts. Raises when the database cannot say."""
        standing = self._standing
        if standing is not None and _lately(self._confirmed_at) and standing.in_force():
            return True
        return await self._look_up()

    async def may_hear(self) -> bool:
        """Before events are sent, once `heard_lately` is no longer so."""
        if self.heard_lately():
            return True
        try:
            return await self._look_up()
        except Exception:
            return self._in_force()  # logged by the lookup

    async def _look_up(self) -> bool:
        if self._standing is None:
            return False
        try:
            checked_at, standing = await _verdict(self.credential)
        except Exception:
            self._tried_at = time.monotonic()
            raise
        if self._standing is not None and standing is not None:
            # Not a later verdict on an earlier lapse: once failed, the credentials stay failed.
            self._standing, self._confirmed_at, self._tried_at = standing, checked_at, checked_at
        else:
            self._standing = None
        return self._in_force()

    def _in_force(self) -> bool:
        if self._standing is not None and not self._standing.in_force():
            self._standing = None
        return self._standing is not None


async def authenticate_socket(scope: SocketScope, thread_id: uuid.UUID) -> SocketCredentials | None:
    """Who a websocket handshake acts for: a single-use ticket for this thread, the API headers, or the session.

    The session needs no CSRF token here: browsers always send Origin, which must name one of our hosts.
    """
    headers = {name.decode("latin1").lower(): value.decode("latin1") for name, value in scope.get("headers", [])}
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if tickets:
        credentials = await _by_ticket(tickets[0], thread_id)
    elif "x-api-key" in headers:
        credentials = await _by_key(headers)
    else:
        credentials = await db(_by_session)(scope, time.monotonic())  # the user was read as the handshake began
    if credentials is not None:
        # Set in the socket's own task: every frame it acts on, and every run it starts, acts as it.
        login = scope.get("user") if isinstance(credentials.credential, SessionCredential) else None
        act_as(credentials.principal, login if _signed_in(login) else None)
    return credentials


async def _by_ticket(raw: str, thread_id: uuid.UUID) -> SocketCredentials | None:
    ticket = await db(ticket_redeem)(raw)
    if ticket is None or ticket.thread_id != thread_id or ticket.api_key_id is None:
        return None
    # The ticket stands for its key as the key is now: revoking the key revokes the ticket too.
    checked_at = time.monotonic()
    key = await db(_usable_key)(ticket.api_key_id)
    if key is None:
        return None
    principal = Principal(user_id=ticket.user_id, api_key_id=key.pk, events=key.events)
    return SocketCredentials(principal, KeyCredential(key.pk), Standing(expiry=key.expiry_date), checked_at)


async def _by_key(headers: dict[str, str]) -> SocketCredentials | None:
    raw = headers.get("x-api-key")
    if not raw:
        return None
    checked_at, grant = await db(_key_verdict)(raw)
    if grant is None or not grant.in_force():
        return None
    try:
        user_id = parse_user_id(headers.get("x-user-id"))
    except InvalidUserId:
        return None
    principal = Principal(user_id=user_id, api_key_id=grant.key_id, events=grant.events)
    return SocketCredentials(principal, KeyCredential(grant.key_id), grant, checked_at)


def _by_session(scope: SocketScope, checked_at: float) -> SocketCredentials | None:
    user, session = scope.get("user"), scope.get("session")
    if not _signed_in(user) or session is None or session.session_key is None:
        return None
    principal = Principal(user_id=profile_user_id(user=user))
    login = user._meta.pk.value_to_string(user)
    credential = SessionCredential(session_key=session.session_key, login=login, user_id=principal.user_id)
    return SocketCredentials(principal, credential, Standing(expiry=None), checked_at)
