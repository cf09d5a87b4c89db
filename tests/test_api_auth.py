"""Authentication and identity: the API key names the caller, X-User-ID the end user it acts for."""

import asyncio
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from bankagent import async_views
from identity import authentication
from identity.authentication import _recent as recent_keys
from identity.authentication import authenticate_socket
from identity.models import APIKey
from threads.models import Message, Thread

THREADS = "/api/v1/threads"
USER = uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301")
THREAD = uuid.UUID("9b2c1f7e-1a43-4d7e-8f52-6c1d0e4a7b35")
WRONG_KEY = "AbCdEfGh.ThisIsNotAKeyThisServerIssued0123456789"


def keyed(key: str, user_id: str | None = str(USER)) -> APIClient:
    api = APIClient()
    headers = {"HTTP_X_API_KEY": key}
    if user_id is not None:
        headers["HTTP_X_USER_ID"] = user_id
    api.credentials(**headers)
    return api


def counts() -> tuple[int, int]:
    return Thread.objects.count(), Message.objects.count()


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if "details" in error:
        assert isinstance(error["details"], dict)
    return error


# Missing, wrong, revoked and expired keys


def test_missing_key_is_401_json_with_www_authenticate(anonymous, db):
    response = anonymous.get(THREADS, HTTP_X_USER_ID=str(USER))

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"]


def test_missing_key_writes_nothing(anonymous, db):
    before = counts()

    response = anonymous.post(THREADS, {"agent_type": "general_chat"}, format="json", HTTP_X_USER_ID=str(USER))

    assert response.status_code == 401
    assert counts() == before


def test_wrong_key_is_401_with_www_authenticate(db):
    response = keyed(WRONG_KEY).get(THREADS)

    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"]


@pytest.mark.parametrize("key", ["", "no-dot-at-all", ".", "x" * 500])
def test_garbage_key_is_401(db, key):
    response = keyed(key).get(THREADS)

    assert response.status_code == 401
    assert response.json()["error"]["code"] in {"not_authenticated", "authentication_failed"}


def test_wrong_key_writes_nothing(db):
    before = counts()

    response = keyed(WRONG_KEY).post(THREADS, {"agent_type": "general_chat"}, format="json")

    assert response.status_code == 401
    assert counts() == before


def test_revoked_key_is_401_where_it_was_not_verified_lately(db):
    api_key, key = APIKey.objects.create_key(name="revoked")
    assert keyed(key).get(THREADS).status_code == 200
    api_key.revoked = True
    api_key.save()
    recent_keys.clear()  # as in a process that has not seen the key lately

    response = keyed(key).get(THREADS)

    assert_error(response, 401, "authentication_failed")


def test_key_whose_verification_lapses_during_the_request_is_verified_again(db, monkeypatch):
    _, key = APIKey.objects.create_key(name="lapsing")
    thread = Thread.objects.create(user_id=USER, agent_type="general_chat")
    # The run endpoints check a key inline when it was verified lately; here it lapses just after that check.
    monkeypatch.setattr(async_views, "credentials_cached", lambda request: True)

    response = keyed(key).post("/api/v1/agent/query", {"thread_id": str(thread.pk), "query": "Hi"}, format="json")

    assert response.status_code == 200, response.content


def test_a_flood_of_unknown_keys_does_not_forget_every_verified_key(db, settings, monkeypatch):
    monkeypatch.setattr(authentication, "_RECENT_MAX", 10)
    _, key = APIKey.objects.create_key(name="in use")
    for attempt in range(30):
        if attempt % 5 == 0:
            authentication.key_grant(key)
        authentication.key_grant(f"unknown-{attempt}")

    with CaptureQueriesContext(connection) as captured:
        assert authentication.key_grant(key) is not None

    assert len(captured) == 0
    assert len(recent_keys) <= 10


def test_expired_key_is_401(db):
    _, key = APIKey.objects.create_key(name="expired", expiry_date=timezone.now() - timedelta(seconds=1))

    response = keyed(key).get(THREADS)

    assert_error(response, 401, "authentication_failed")


def test_key_expiring_in_the_future_is_accepted(db):
    _, key = APIKey.objects.create_key(name="expiring", expiry_date=timezone.now() + timedelta(days=1))

    assert keyed(key).get(THREADS).status_code == 200


def test_expired_key_writes_nothing(db):
    _, key = APIKey.objects.create_key(name="expired", expiry_date=timezone.now() - timedelta(days=1))
    before = counts()

    response = keyed(key).post(THREADS, {"agent_type": "general_chat"}, format="json")

    assert response.status_code == 401
    assert counts() == before


# The cache of verified keys


@pytest.fixture
def key_clock(monkeypatch, settings):
    """The clock of the API key cache, frozen; the test moves it. Only authentication's clock: the rest runs on."""
    settings.API_KEY_CACHE_SECONDS = 5
    now = [1_000.0]
    monkeypatch.setattr(authentication, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def advance_to(seconds: float) -> None:
        now[0] = 1_000.0 + seconds

    return advance_to


def api_key_queries(captured: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in captured if APIKey._meta.db_table in query["sql"]]


def test_revoked_key_keeps_working_for_at_most_api_key_cache_seconds_then_is_401(db, key_clock):
    api_key, key = APIKey.objects.create_key(name="revoked")
    assert keyed(key).get(THREADS).status_code == 200
    api_key.revoked = True
    api_key.save()

    key_clock(4.999)
    assert keyed(key).get(THREADS).status_code == 200
    key_clock(5)
    assert_error(keyed(key).get(THREADS), 401, "authentication_failed")
    key_clock(4_000)
    assert_error(keyed(key).get(THREADS), 401, "authentication_failed")


def test_expired_key_is_401_at_once_even_while_it_is_remembered(db, key_clock, monkeypatch):
    expiry = timezone.now() + timedelta(hours=1)
    api_key, key = APIKey.objects.create_key(name="expiring", expiry_date=expiry)
    assert keyed(key).get(THREADS).status_code == 200
    # Revoked too: from here on only the remembered grant can let the key in.
    api_key.revoked = True
    api_key.save()
    assert keyed(key).get(THREADS).status_code == 200

    monkeypatch.setattr(timezone, "now", lambda: expiry)

    assert_error(keyed(key).get(THREADS), 401, "authentication_failed")


def test_wrong_key_is_401_and_its_refusal_is_remembered_without_a_query(db, key_clock):
    with CaptureQueriesContext(connection) as first:
        assert_error(keyed(WRONG_KEY).get(THREADS), 401, "authentication_failed")
    key_clock(4.999)
    with CaptureQueriesContext(connection) as again:
        assert_error(keyed(WRONG_KEY).get(THREADS), 401, "authentication_failed")
    key_clock(5)
    with CaptureQueriesContext(connection) as later:
        assert_error(keyed(WRONG_KEY).get(THREADS), 401, "authentication_failed")

    assert api_key_queries(first)
    assert api_key_queries(again) == []
    assert api_key_queries(later)


def test_remembered_key_is_verified_without_a_query(api_key, key_clock):
    assert keyed(api_key).get(THREADS).status_code == 200

    with CaptureQueriesContext(connection) as captured:
        assert keyed(api_key).get(THREADS).status_code == 200

    assert api_key_queries(captured) == []


@pytest.mark.django_db(transaction=True)
async def test_open_sockets_on_one_key_share_one_lookup_per_period_and_stop_together(key_clock, monkeypatch):
    api_key, key = await sync_to_async(APIKey.objects.create_key)(name="many sockets")
    scope = {"headers": [(b"x-api-key", key.encode()), (b"x-user-id", str(USER).encode())]}
    sockets = [await authenticate_socket(scope, THREAD) for _ in range(3)]
    lookups = []
    look_up = authentication.KeyCredential.look_up

    def counted(credential: authentication.KeyCredential) -> authentication.Standing | None:
        lookups.append(credential)
        return look_up(credential)

    monkeypatch.setattr(authentication.KeyCredential, "look_up", counted)

    key_clock(4.999)
    assert all(credentials.heard_lately() for credentials in sockets)
    key_clock(5)
    assert not any(credentials.heard_lately() for credentials in sockets)
    checks = [credentials.may_act() for credentials in sockets] + [credentials.may_hear() for credentials in sockets]
    assert await asyncio.gather(*checks) == [True] * 6
    assert len(lookups) == 1

    await APIKey.objects.filter(pk=api_key.pk).aupdate(revoked=True)
    key_clock(9.999)
    assert [await credentials.may_act() for credentials in sockets] == [True] * 3
    key_clock(10)
    assert [await credentials.may_hear() for credentials in sockets] == [False] * 3
    assert [await credentials.may_act() for credentials in sockets] == [False] * 3
    assert len(lookups) == 2


# X-User-ID


def test_missing_user_id_is_400_invalid_user_id(api_key):
    response = keyed(api_key, user_id=None).get(THREADS)

    assert_error(response, 400, "invalid_user_id")


def test_empty_user_id_is_400_invalid_user_id(api_key):
    response = keyed(api_key, user_id="").get(THREADS)

    assert_error(response, 400, "invalid_user_id")


@pytest.mark.parametrize(
    "raw",
    [
        "not-a-uuid",
        "12345",
        "3f2504e0-4f89-41d3-9a0c-0305e82c330",  # one digit short
        "3f2504e0-4f89-41d3-9a0c-0305e82c33011",  # one digit long
        "3f2504e0-4f89-41d3-9a0c-0305e82c330g",  # not hexadecimal
        "00000000000000000000000000000000000000",
        "3f2504e0 4f89 41d3 9a0c 0305e82c3301",
        "'; DROP TABLE threads_thread; --",
    ],
)
def test_malformed_user_id_is_400_invalid_user_id(api_key, raw):
    response = keyed(api_key, user_id=raw).get(THREADS)

    assert_error(response, 400, "invalid_user_id")


def test_malformed_user_id_writes_nothing(api_key):
    before = counts()

    response = keyed(api_key, user_id="not-a-uuid").post(THREADS, {"agent_type": "general_chat"}, format="json")

    assert_error(response, 400, "invalid_user_id")
    assert counts() == before


def test_missing_key_and_missing_user_id_is_401(anonymous, db):
    response = anonymous.get(THREADS)

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"]


def test_wrong_key_and_malformed_user_id_is_401(db):
    response = keyed(WRONG_KEY, user_id="not-a-uuid").get(THREADS)

    assert_error(response, 401, "authentication_failed")


SPELLINGS = [
    str(USER),
    str(USER).upper(),
    "{" + str(USER) + "}",
    "{" + str(USER).upper() + "}",
    "urn:uuid:" + str(USER),
    USER.hex,
    USER.hex.upper(),
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_uuid_spelling_creates_threads_in_canonical_lowercase(api_key, spelling):
    response = keyed(api_key, user_id=spelling).post(THREADS, {"agent_type": "general_chat"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["user_id"] == "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
    assert Thread.objects.get(pk=response.json()["id"]).user_id == USER


def test_every_uuid_spelling_names_the_same_user(api_key):
    created = keyed(api_key, user_id=str(USER).upper()).post(THREADS, {"agent_type": "general_chat"}, format="json")
    assert created.status_code == 201
    thread_id = created.json()["id"]

    for spelling in SPELLINGS:
        api = keyed(api_key, user_id=spelling)
        listed = api.get(THREADS)
        assert listed.status_code == 200, spelling
        assert [thread["id"] for thread in listed.json()] == [thread_id], spelling
        assert [thread["user_id"] for thread in listed.json()] == [str(USER)], spelling
        detail = api.get(f"{THREADS}/{thread_id}")
        assert detail.status_code == 200, spelling
        assert detail.json()["user_id"] == str(USER), spelling


def test_another_user_does_not_see_the_thread(api_key, other_user_id):
    created = keyed(api_key).post(THREADS, {"agent_type": "general_chat"}, format="json")
    thread_id = created.json()["id"]

    other = keyed(api_key, user_id=str(other_user_id))

    assert other.get(THREADS).json() == []
    assert_error(other.get(f"{THREADS}/{thread_id}"), 404, "not_found")


# Endpoints open without a key


def test_health_needs_no_key(anonymous, db):
    response = anonymous.get("/api/v1/health")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_health_ignores_a_wrong_key(db):
    response = keyed(WRONG_KEY, user_id="not-a-uuid").get("/api/v1/health")

    assert response.status_code == 200


def test_openapi_schema_needs_no_key(anonymous, db):
    response = anonymous.get("/api/schema/")

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/threads" in schema["paths"]


def test_api_docs_need_no_key(anonymous, db):
    response = anonymous.get("/api/docs/")

    assert response.status_code == 200
    assert b"/api/schema/" in response.content


# OPTIONS and CORS


def test_options_without_key_is_401(anonymous, db):
    response = anonymous.options(THREADS, HTTP_X_USER_ID=str(USER))

    assert_error(response, 401, "not_authenticated")


def test_options_with_wrong_key_is_401(db):
    response = keyed(WRONG_KEY).options(THREADS)

    assert_error(response, 401, "authentication_failed")


def test_options_with_key_is_answered(client):
    response = client.options(THREADS)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")


def test_cors_preflight_gets_no_cors_headers(anonymous, db):
    response = anonymous.options(
        THREADS,
        HTTP_ORIGIN="https://evil.example",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="x-api-key, x-user-id",
    )

    assert response.status_code == 401
    assert not [header for header in response.headers if header.lower().startswith("access-control-")]


def test_authenticated_response_has_no_cors_headers(client):
    response = client.get(THREADS, HTTP_ORIGIN="https://evil.example")

    assert response.status_code == 200
    assert not [header for header in response.headers if header.lower().startswith("access-control-")]


# Secrets never echoed


def test_wrong_key_is_not_echoed_in_the_error(db):
    response = keyed(WRONG_KEY).get(THREADS)

    assert response.status_code == 401
    assert WRONG_KEY.encode() not in response.content
    assert b"ThisIsNotAKey" not in response.content
    assert WRONG_KEY not in str(response.headers)


def test_revoked_key_is_not_echoed_in_the_error(db):
    api_key, key = APIKey.objects.create_key(name="revoked")
    api_key.revoked = True
    api_key.save()

    response = keyed(key).get(THREADS)

    assert response.status_code == 401
    assert key.encode() not in response.content
    assert key.split(".")[1].encode() not in response.content


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("get", THREADS, None, 400),  # malformed X-User-ID below
        ("post", THREADS, b'{"agent_type": ', 400),
        ("post", THREADS, b'{"agent_type": "no_such_agent"}', 422),
        ("get", f"{THREADS}/{uuid.uuid4()}", None, 404),
        ("get", "/api/v1/nothing-here", None, 404),
        ("put", THREADS, b"{}", 405),
    ],
)
def test_valid_key_is_not_echoed_in_any_error(api_key, method, path, body, status):
    user_id = "not-a-uuid" if status == 400 and body is None else str(USER)
    api = keyed(api_key, user_id=user_id)

    if body is None:
        response = getattr(api, method)(path)
    else:
        response = api.generic(method.upper(), path, data=body, content_type="application/json")

    assert response.status_code == status, response.content
    assert "error" in response.json()
    assert api_key.encode() not in response.content
    assert api_key.split(".")[1].encode() not in response.content
