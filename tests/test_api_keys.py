"""API keys: the create_api_key command, and the event dialect a key gives the requests it authenticates."""

import uuid
from datetime import timedelta
from io import StringIO

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.contrib.sessions.backends.base import SessionBase
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from identity.authentication import APIKeyAuthentication, Principal, authenticate_socket
from identity.models import APIKey
from identity.services import login_ensure
from identity.tickets import ticket_issue

USER = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
THREAD = uuid.UUID("9b2c1f7e-1a43-4d7e-8f52-6c1d0e4a7b35")
LEGACY_LABEL = "legacy: deltas named `token`, and no tool events"


def create_api_key(*args: str) -> list[str]:
    out = StringIO()
    call_command("create_api_key", *args, stdout=out)
    return out.getvalue().splitlines()


def rest_principal(raw_key: str) -> Principal:
    request = Request(APIRequestFactory().get("/", HTTP_X_API_KEY=raw_key, HTTP_X_USER_ID=str(USER)))
    principal, _ = APIKeyAuthentication().authenticate(request)
    return principal


# The command


def test_create_api_key_prints_a_working_standard_key_last(db):
    lines = create_api_key("billing")

    assert lines[0] == "Created API key 'billing'"
    key = APIKey.objects.get_from_key(lines[-1])
    assert (key.name, key.events) == ("billing", "standard")


def test_create_api_key_with_legacy_events_stores_them_and_the_admin_shows_them(admin_client):
    lines = create_api_key("old client", "--events", "legacy")

    assert lines[0] == "Created API key 'old client', with legacy events"
    assert APIKey.objects.get_from_key(lines[-1]).events == "legacy"
    changelist = admin_client.get("/admin/identity/apikey/")
    assert changelist.status_code == 200
    assert LEGACY_LABEL in changelist.content.decode()


def test_create_api_key_refuses_an_unknown_dialect(db):
    with pytest.raises(CommandError, match="invalid choice"):
        create_api_key("new client", "--events", "modern")

    assert not APIKey.objects.exists()


def test_create_api_key_if_none_keeps_the_existing_key(db):
    create_api_key("dev", "--events", "legacy")

    lines = create_api_key("dev", "--if-none")

    assert lines == ["An API key named 'dev' exists already; its key was printed when it was created."]
    assert APIKey.objects.get(name="dev").events == "legacy"


def test_create_api_key_if_none_creates_a_key_when_the_named_one_has_expired(db):
    create_api_key("dev")
    APIKey.objects.filter(name="dev").update(expiry_date=timezone.now() - timedelta(seconds=1))

    lines = create_api_key("dev", "--if-none")

    assert lines[0] == "Created API key 'dev'"
    assert APIKey.objects.get_usable_keys().filter(name="dev").count() == 2


# The principal


@pytest.mark.parametrize("events", ["standard", "legacy"])
def test_a_rest_request_carries_its_keys_events(db, events):
    key, raw = APIKey.objects.create_key(name="client", events=events)

    assert rest_principal(raw) == Principal(user_id=USER, api_key_id=key.pk, events=events)


@pytest.mark.django_db(transaction=True)
async def test_a_socket_carries_its_keys_events_whether_by_headers_or_by_ticket():
    key, raw = await sync_to_async(APIKey.objects.create_key)(name="old client", events="legacy")
    ticket, _ = await sync_to_async(ticket_issue)(api_key_id=key.pk, user_id=USER, thread_id=THREAD)

    by_headers = await authenticate_socket(
        {"headers": [(b"x-api-key", raw.encode()), (b"x-user-id", str(USER).encode())]}, THREAD
    )
    by_ticket = await authenticate_socket({"query_string": f"ticket={ticket}".encode()}, THREAD)

    assert by_headers.principal == by_ticket.principal == Principal(user_id=USER, api_key_id=key.pk, events="legacy")


@sync_to_async
def signed_in_session(user: User) -> SessionBase:
    browser = Client()
    browser.force_login(user)
    return browser.session


@pytest.mark.django_db(transaction=True)
async def test_a_signed_in_users_socket_gets_the_standard_events():
    user, _ = await sync_to_async(login_ensure)(username="alice", password="unused here", user_id=USER)

    credentials = await authenticate_socket({"user": user, "session": await signed_in_session(user)}, THREAD)

    assert credentials.principal == Principal(user_id=USER, events="standard")
