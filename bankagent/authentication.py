"""API-key authentication: the key names the caller, X-User-ID the end user it acts for."""

import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework_api_key.models import APIKey

from bankagent.exceptions import AuthenticationFailed, InvalidUserId
from bankagent.tickets import ticket_redeem


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the end user, vouched for by an API key holder."""

    user_id: uuid.UUID
    api_key_id: str | None = None
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


def api_key_from(raw: str | None) -> APIKey | None:
    """The usable key matching `raw`, or None. The hash comparison runs in constant time."""
    if not raw:
        return None
    try:
        return _unexpired(APIKey.objects.get_from_key(raw.strip()))
    except APIKey.DoesNotExist:
        return None


class APIKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, APIKey] | None:
        raw_key = request.headers.get("X-API-Key")
        if raw_key is None:
            return None
        key = api_key_from(raw_key)
        if key is None:
            raise AuthenticationFailed()
        user_id = parse_user_id(request.headers.get("X-User-ID"))
        return Principal(user_id=user_id, api_key_id=key.pk), key

    def authenticate_header(self, request: Request) -> str:
        return "X-API-Key"


def _usable_key_id(api_key_id: str | None) -> bool:
    return _unexpired(APIKey.objects.get_usable_keys().filter(pk=api_key_id).first()) is not None


async def authenticate_socket(scope: dict, thread_id: uuid.UUID) -> Principal | None:
    """Who a websocket handshake acts for: a single-use ticket for this thread, or the API headers."""
    headers = {name.decode("latin1").lower(): value.decode("latin1") for name, value in scope.get("headers", [])}
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if tickets:
        ticket = await database_sync_to_async(ticket_redeem)(tickets[0])
        if ticket is None or ticket.thread_id != thread_id:
            return None
        # A key revoked since the ticket was issued revokes the ticket too.
        if not await database_sync_to_async(_usable_key_id)(ticket.api_key_id):
            return None
        return Principal(user_id=ticket.user_id, api_key_id=ticket.api_key_id)
    key = await database_sync_to_async(api_key_from)(headers.get("x-api-key"))
    if key is None:
        return None
    try:
        return Principal(user_id=parse_user_id(headers.get("x-user-id")), api_key_id=key.pk)
    except InvalidUserId:
        return None
