"""The threads, messages, agents and blocking query endpoints, against the contract in API.md."""

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from django.db import DatabaseError, OperationalError
from django.db.utils import DatabaseErrorWrapper
from django.test.client import FakePayload
from django.utils import timezone
from psycopg_pool import PoolTimeout
from pydantic import AwareDatetime, BaseModel
from pydantic_ai.exceptions import (
    ModelAuthenticationError,
    ModelConnectionError,
    ModelHTTPError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelTimeoutError,
    ModelUnavailableError,
)
from pydantic_ai.messages import ModelResponse, TextPart
from rest_framework.test import APIClient

import runs.lease
import runs.runner
from bankagent.db import db
from identity.models import APIKey
from runs.hub import hub
from runs.limits import slots
from runs.services import runs_renew
from tests.conftest import begin_run, saves_then_drops_the_connection
from threads.models import Message, Thread

THREADS = "/api/v1/threads"
QUERY = "/api/v1/agent/query"
THREAD_KEYS = {"id", "user_id", "agent_type", "title", "metadata", "created_at", "updated_at"}
MESSAGE_KEYS = {
    *("id", "thread_id", "role", "content", "output", "status", "metadata", "tool_calls", "approval", "created_at"),
}
BALANCE_QUESTION = "What is my balance?"
SECRET_SQL = 'UPDATE "threads_message" SET "content" = \'secret\' WHERE id = 1'
SECRET_BODY = "provider said: sk-live-0123456789"


# The shapes the seed's own Python client validates (extra fields are ignored, as pydantic does by default).
class ThreadResponse(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    agent_type: str
    title: str | None
    metadata: dict[str, Any]
    created_at: AwareDatetime
    updated_at: AwareDatetime


class MessageResponse(BaseModel):
    id: uuid.UUID
    thread_id: uuid.UUID
    role: Literal["user", "assistant", "system"]
    content: str
    created_at: AwareDatetime


class ThreadDetailResponse(ThreadResponse):
    messages: list[MessageResponse]


class AgentResponse(BaseModel):
    thread_id: uuid.UUID
    message_id: uuid.UUID
    response: str


_LINK_VALUE = re.compile(r"<(?P<url>[^>]*)>(?P<params>(?:\s*;\s*[^;,]+)*)")


def links(response) -> dict[str, str]:
    """The RFC 8288 `Link` header as {rel: url}."""
    found: dict[str, str] = {}
    for match in _LINK_VALUE.finditer(response.headers.get("Link", "")):
        for param in match.group("params").split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "rel":
                for rel in value.strip().strip('"').split():
                    found[rel.lower()] = match.group("url")
    return found


def next_url(response) -> str | None:
    return links(response).get("next")


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def all_pages(client, url: str, *, between=None) -> list[list[dict[str, Any]]]:
    """Follow `Link: rel="next"` to the end; `between(n)` runs after page n is fetched."""
    pages = []
    while url:
        response = client.get(path_of(url))
        assert response.status_code == 200, response.content
        pages.append(response.json())
        if between is not None:
            between(len(pages))
        url = next_url(response)
        assert len(pages) < 1000, "pagination does not end"
    return pages


def assert_canonical_uuid(value: Any) -> None:
    assert isinstance(value, str)
    assert str(uuid.UUID(value)) == value


def assert_utc_timestamp(value: Any) -> datetime:
    assert isinstance(value, str)
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def set_updated_at(thread: Thread, when: datetime) -> None:
    Thread.objects.filter(pk=thread.pk).update(updated_at=when)


def make_messages(thread: Thread, count: int) -> list[Message]:
    """`count` messages sharing one timestamp, so only `seq` can order them."""
    when = timezone.now()
    messages = Message.objects.bulk_create(
        Message(
            thread=thread,
            seq=seq,
            role=Message.Role.USER if seq % 2 else Message.Role.ASSISTANT,
            content=f"message {seq}",
        )
        for seq in range(1, count + 1)
    )
    Message.objects.filter(thread=thread).update(created_at=when)
    Thread.objects.filter(pk=thread.pk).update(last_seq=count)
    return messages


def start_run(thread: Thread, query: str) -> tuple[Message, Message]:
    """A turn whose run is still going: the question, and the answer it is writing under a live lease."""
    start = begin_run(thread, query)
    return start.user_message, start.assistant_message


def lapse(message: Message) -> None:
    """The lease of a run whose process died: it was not renewed in time."""
    Message.objects.filter(pk=message.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def ask(client, thread_id: Any, query: str = BALANCE_QUESTION):
    return client.post(QUERY, {"thread_id": str(thread_id), "query": query}, format="json")


def detail_messages(client, thread: Thread) -> list[dict[str, Any]]:
    response = client.get(f"{THREADS}/{thread.id}")
    assert response.status_code == 200, response.content
    return response.json()["messages"]


def listed_messages(client, thread: Thread) -> list[dict[str, Any]]:
    response = client.get(f"{THREADS}/{thread.id}/messages")
    assert response.status_code == 200, response.content
    return response.json()


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_no_internals(response, error: dict[str, Any]) -> None:
    """Never a traceback, a statement, a provider's words or a secret in an error."""
    content = response.content.decode()
    for internal in ("Traceback", "SELECT", "UPDATE", "locked", "threads_message", "sk-live", "provider said"):
        assert internal not in content, (internal, error)


@pytest.fixture
def free_slots():
    """Every run, however it ends, gives its slot back."""
    taken = slots.taken
    yield
    assert slots.taken == taken


# Create


def test_create_thread_answers_201_with_the_thread_shape(client, user_id):
    response = client.post(
        THREADS, {"agent_type": "bank_support", "title": "Card help", "metadata": {"channel": "web"}}, format="json"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == THREAD_KEYS
    assert_canonical_uuid(body["id"])
    assert_canonical_uuid(body["user_id"])
    assert body["user_id"] == str(user_id)
    assert (body["agent_type"], body["title"], body["metadata"]) == ("bank_support", "Card help", {"channel": "web"})
    assert_utc_timestamp(body["created_at"])
    assert_utc_timestamp(body["updated_at"])
    ThreadResponse.model_validate(body)
    stored = Thread.objects.get(pk=body["id"])
    assert (stored.user_id, stored.title, stored.metadata) == (user_id, "Card help", {"channel": "web"})


def test_create_thread_without_title_or_metadata_has_null_title_and_empty_metadata(client):
    response = client.post(THREADS, {"agent_type": "general_chat"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["title"] is None
    assert response.json()["metadata"] == {}


def test_create_thread_with_an_unknown_agent_type_is_422_listing_the_known_ones(client):
    response = client.post(THREADS, {"agent_type": "tax_advisor"}, format="json")

    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "bank_support" in message
    assert "general_chat" in message
    assert not Thread.objects.exists()


# List


def test_list_is_a_plain_array_of_only_the_callers_threads_newest_updated_first(client, make_thread, other_user_id):
    now = timezone.now()
    oldest, newest, middle = make_thread(title="oldest"), make_thread(title="newest"), make_thread(title="middle")
    set_updated_at(oldest, now - timedelta(hours=2))
    set_updated_at(middle, now - timedelta(hours=1))
    set_updated_at(newest, now)
    make_thread(user=other_user_id, title="someone else's")

    response = client.get(THREADS)

    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list)
    assert [item["title"] for item in body] == ["newest", "middle", "oldest"]
    for item in body:
        assert set(item) == THREAD_KEYS
        ThreadResponse.model_validate(item)
    assert "Link" not in response.headers


def test_list_filters_by_agent_type(client, make_thread):
    make_thread(agent_type="bank_support", title="bank")
    make_thread(agent_type="general_chat", title="chat one")
    make_thread(agent_type="general_chat", title="chat two")

    response = client.get(THREADS, {"agent_type": "general_chat"})

    assert response.status_code == 200
    assert sorted(item["title"] for item in response.json()) == ["chat one", "chat two"]
    assert {item["agent_type"] for item in response.json()} == {"general_chat"}


def test_an_empty_agent_type_filter_is_no_filter(client, make_thread):
    make_thread(agent_type="bank_support", title="bank")
    make_thread(agent_type="general_chat", title="chat")

    response = client.get(THREADS, {"agent_type": ""})

    assert response.status_code == 200
    assert sorted(item["title"] for item in response.json()) == ["bank", "chat"]


@pytest.mark.parametrize("agent_type", ["tax_advisor", " general_chat"])
def test_an_unknown_agent_type_filter_is_422_listing_the_known_ones(client, agent_type):
    response = client.get(THREADS, {"agent_type": agent_type})

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_agent_type"
    assert response.json()["error"]["details"]["known_agent_types"] == ["bank_support", "general_chat"]


def test_list_serves_20_threads_by_default_and_respects_limit(client, make_thread):
    for index in range(23):
        make_thread(title=f"t{index}")

    assert len(client.get(THREADS).json()) == 20
    assert len(client.get(THREADS, {"limit": "3"}).json()) == 3
    assert len(client.get(THREADS, {"limit": "100"}).json()) == 23


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "2.5"])
def test_list_limit_outside_1_to_100_is_400_invalid_limit(client, limit):
    response = client.get(THREADS, {"limit": limit})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_limit"


def test_list_cursor_the_server_did_not_issue_is_400_invalid_cursor(client, make_thread):
    make_thread()

    response = client.get(THREADS, {"cursor": "forged"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8])
def test_pagination_serves_every_thread_exactly_once_in_order(client, make_thread, limit):
    now = timezone.now()
    threads = [make_thread(title=f"t{index}") for index in range(7)]
    for index, thread in enumerate(threads):
        set_updated_at(thread, now - timedelta(minutes=index))

    pages = all_pages(client, f"{THREADS}?limit={limit}")

    assert all(len(page) <= limit for page in pages)
    assert all(len(page) == limit for page in pages[:-1])
    served = [item["id"] for page in pages for item in page]
    assert served == [str(thread.id) for thread in threads]


def test_pagination_serves_every_thread_once_when_updated_at_ties(client, make_thread):
    threads = [make_thread(title=f"t{index}") for index in range(9)]
    Thread.objects.update(updated_at=timezone.now())

    pages = all_pages(client, f"{THREADS}?limit=2")

    served = [item["id"] for page in pages for item in page]
    assert len(served) == len(set(served))
    assert set(served) == {str(thread.id) for thread in threads}


def test_pagination_serves_every_thread_once_while_new_threads_are_created(client, make_thread):
    existing = {str(make_thread(title=f"t{index}").id) for index in range(7)}

    def create_two(page_number: int) -> None:
        for _ in range(2):
            assert client.post(THREADS, {"agent_type": "general_chat"}, format="json").status_code == 201

    pages = all_pages(client, f"{THREADS}?limit=2", between=create_two)

    served = [item["id"] for page in pages for item in page]
    assert len(served) == len(set(served))
    assert set(served) == existing


def test_last_page_has_no_link_header(client, make_thread):
    for _ in range(4):
        make_thread()

    first = client.get(THREADS, {"limit": "2"})
    last = client.get(path_of(next_url(first)))

    assert next_url(first) is not None
    assert len(last.json()) == 2
    assert "Link" not in last.headers
    assert "Link" not in client.get(THREADS, {"agent_type": "general_chat"}).headers


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1"])
def test_link_url_uses_the_request_host_and_keeps_limit_and_filter(client, make_thread, host):
    for _ in range(3):
        make_thread(agent_type="general_chat")

    response = client.get(THREADS, {"limit": "2", "agent_type": "general_chat"}, HTTP_HOST=host)

    url = urlsplit(next_url(response))
    assert url.netloc == host
    assert url.path == THREADS
    query = parse_qs(url.query)
    assert query["limit"] == ["2"]
    assert query["agent_type"] == ["general_chat"]
    assert query["cursor"]


def test_following_links_of_a_filtered_list_stays_filtered(client, make_thread):
    chats = {str(make_thread(agent_type="general_chat").id) for _ in range(5)}
    for _ in range(5):
        make_thread(agent_type="bank_support")

    pages = all_pages(client, f"{THREADS}?limit=2&agent_type=general_chat")

    served = [item["id"] for page in pages for item in page]
    assert sorted(served) == sorted(chats)


# Detail


def test_detail_is_the_thread_with_its_messages_and_has_more_messages(client, make_thread):
    thread = make_thread(title="detail")
    start_run(thread, "hello")

    response = client.get(f"{THREADS}/{thread.id}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == THREAD_KEYS | {"messages", "has_more_messages", "active_run", "summary"}
    assert body["active_run"] == {"message_id": body["messages"][-1]["id"], "last_seq": 0}  # no event sent yet
    assert body["summary"] is None  # the model sees the whole thread
    assert body["id"] == str(thread.id)
    assert body["has_more_messages"] is False
    assert [(m["role"], m["content"], m["status"]) for m in body["messages"]] == [
        ("user", "hello", "complete"),
        ("assistant", "", "in_progress"),
    ]
    for message in body["messages"]:
        assert set(message) == MESSAGE_KEYS
        assert_canonical_uuid(message["id"])
        assert message["thread_id"] == str(thread.id)
        assert_utc_timestamp(message["created_at"])
    ThreadDetailResponse.model_validate(body)


def test_detail_shows_the_latest_50_of_55_messages_in_chronological_order(client, make_thread):
    thread = make_thread()
    make_messages(thread, 55)

    body = client.get(f"{THREADS}/{thread.id}").json()

    assert [m["content"] for m in body["messages"]] == [f"message {seq}" for seq in range(6, 56)]
    assert body["has_more_messages"] is True
    ThreadDetailResponse.model_validate(body)


def test_detail_of_a_thread_with_exactly_50_messages_has_no_more(client, make_thread):
    thread = make_thread()
    make_messages(thread, 50)

    body = client.get(f"{THREADS}/{thread.id}").json()

    assert len(body["messages"]) == 50
    assert body["messages"][0]["content"] == "message 1"
    assert body["has_more_messages"] is False


def test_detail_of_55_turn_messages_made_by_runs_keeps_the_window(client, make_thread, make_turn):
    thread = make_thread()
    for index in range(28):
        make_turn(thread, query=f"question {index}")
    Message.objects.filter(thread=thread).update(created_at=timezone.now())

    body = client.get(f"{THREADS}/{thread.id}").json()

    assert body["has_more_messages"] is True
    assert len(body["messages"]) == 50
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == [f"question {i}" for i in range(3, 28)]


# Patch


def test_patch_changes_title_and_metadata(client, make_thread):
    thread = make_thread(title="before", metadata={"a": 1})

    response = client.patch(f"{THREADS}/{thread.id}", {"title": "after", "metadata": {"b": 2}}, format="json")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == THREAD_KEYS
    assert (body["title"], body["metadata"]) == ("after", {"b": 2})
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("after", {"b": 2})


def test_patch_with_null_title_clears_it_and_leaves_metadata(client, make_thread):
    thread = make_thread(title="before", metadata={"a": 1})

    response = client.patch(f"{THREADS}/{thread.id}", {"title": None}, format="json")

    assert response.status_code == 200
    assert (response.json()["title"], response.json()["metadata"]) == (None, {"a": 1})
    thread.refresh_from_db()
    assert thread.title is None


def test_patch_ignores_read_only_fields_and_never_changes_the_owner(client, make_thread, user_id, other_user_id):
    thread = make_thread(title="mine")
    before = ThreadResponse.model_validate(client.get(f"{THREADS}/{thread.id}").json())

    response = client.patch(
        f"{THREADS}/{thread.id}",
        {
            "id": str(uuid.uuid4()),
            "user_id": str(other_user_id),
            "agent_type": "general_chat",
            "created_at": "2000-01-01T00:00:00Z",
            "title": "still mine",
        },
        format="json",
    )

    assert response.status_code == 200
    after = ThreadResponse.model_validate(response.json())
    assert (after.id, after.user_id, after.agent_type, after.created_at) == (
        before.id,
        user_id,
        "bank_support",
        before.created_at,
    )
    thread.refresh_from_db()
    assert (thread.user_id, thread.agent_type, thread.title) == (user_id, "bank_support", "still mine")


# Delete


def test_delete_answers_204_removes_the_messages_and_then_the_thread_is_404(client, make_thread, make_turn):
    thread = make_thread()
    make_turn(thread, query="first")
    start_run(thread, "second")
    kept = make_thread()
    make_turn(kept, query="unrelated")

    response = client.delete(f"{THREADS}/{thread.id}")

    assert response.status_code == 204
    assert not response.content
    assert not Thread.objects.filter(pk=thread.pk).exists()
    assert not Message.objects.filter(thread_id=thread.pk).exists()
    assert Message.objects.filter(thread=kept).count() == 2
    assert client.get(f"{THREADS}/{thread.id}").status_code == 404
    assert client.get(f"{THREADS}/{thread.id}/messages").status_code == 404
    assert client.delete(f"{THREADS}/{thread.id}").status_code == 404


# Messages


def test_messages_list_is_chronological_and_link_next_points_to_the_older_page(client, make_thread):
    thread = make_thread()
    make_messages(thread, 7)

    first = client.get(f"{THREADS}/{thread.id}/messages", {"limit": "3"})

    assert first.status_code == 200
    assert [m["content"] for m in first.json()] == ["message 5", "message 6", "message 7"]
    for message in first.json():
        assert set(message) == MESSAGE_KEYS
    second = client.get(path_of(next_url(first)))
    assert [m["content"] for m in second.json()] == ["message 2", "message 3", "message 4"]
    third = client.get(path_of(next_url(second)))
    assert [m["content"] for m in third.json()] == ["message 1"]
    assert "Link" not in third.headers


def test_messages_pages_cover_every_message_exactly_once(client, make_thread):
    thread = make_thread()
    make_messages(thread, 12)

    pages = all_pages(client, f"{THREADS}/{thread.id}/messages?limit=5")

    assert [len(page) for page in pages] == [5, 5, 2]
    in_order = [m["content"] for page in reversed(pages) for m in page]
    assert in_order == [f"message {seq}" for seq in range(1, 13)]


def test_messages_list_defaults_to_50(client, make_thread):
    thread = make_thread()
    make_messages(thread, 51)

    response = client.get(f"{THREADS}/{thread.id}/messages")

    assert len(response.json()) == 50
    assert response.json()[0]["content"] == "message 2"
    assert next_url(response) is not None


# Agents


def test_agents_list_describes_bank_support_and_general_chat(client):
    response = client.get("/api/v1/agents")

    assert response.status_code == 200
    agents = {item["agent_type"]: item for item in response.json()}
    assert {"bank_support", "general_chat"} <= set(agents)
    for item in response.json():
        assert set(item) == {"agent_type", "description", "output_schema"}
        assert isinstance(item["description"], str)
        assert item["description"]
        assert isinstance(item["output_schema"], dict)
    support_schema = agents["bank_support"]["output_schema"]
    assert support_schema["type"] == "object"
    assert set(support_schema["properties"]) == {"support_advice", "block_card", "risk_level", "follow_up_actions"}
    assert agents["general_chat"]["output_schema"] == {"type": "string"}


# Ownership


FOREIGN_CALLS = {
    "get thread": lambda api, thread_id: api.get(f"{THREADS}/{thread_id}"),
    "patch thread": lambda api, thread_id: api.patch(
        f"{THREADS}/{thread_id}", {"title": "hijacked", "metadata": {"x": 1}}, format="json"
    ),
    "delete thread": lambda api, thread_id: api.delete(f"{THREADS}/{thread_id}"),
    "list messages": lambda api, thread_id: api.get(f"{THREADS}/{thread_id}/messages"),
    "agent query": lambda api, thread_id: ask(api, thread_id),
    "agent stream": lambda api, thread_id: api.post(
        "/api/v1/agent/stream", {"thread_id": str(thread_id), "query": BALANCE_QUESTION}, format="json"
    ),
    "ws ticket": lambda api, thread_id: api.post("/api/v1/ws-tickets", {"thread_id": str(thread_id)}, format="json"),
}


def snapshot(thread: Thread) -> tuple[Any, ...]:
    row = Thread.objects.filter(pk=thread.pk).values().first()
    messages = list(Message.objects.filter(thread_id=thread.pk).order_by("seq").values())
    return row, messages


@pytest.mark.parametrize("call", FOREIGN_CALLS.values(), ids=FOREIGN_CALLS.keys())
def test_foreign_thread_is_404_everywhere_like_a_missing_one_and_writes_nothing(
    client, make_thread, other_user_id, call
):
    foreign = make_thread(user=other_user_id, title="theirs", metadata={"secret": "yes"})
    start_run(foreign, "their question")  # busy, too: still a 404, never a 409
    before = snapshot(foreign)

    missing = call(client, uuid.uuid4())
    response = call(client, foreign.id)

    assert missing.status_code == 404
    assert response.status_code == 404
    assert response.json() == missing.json()
    assert response.json()["error"]["code"] == "not_found"
    assert "theirs" not in response.content.decode()
    assert snapshot(foreign) == before
    assert Message.objects.count() == 2


def test_foreign_threads_never_appear_in_the_list(client, make_thread, other_user_id):
    make_thread(user=other_user_id)

    assert client.get(THREADS).json() == []


# Blocking query


def test_query_answers_in_the_seed_shape_plus_user_message_id_and_output(client, make_thread):
    thread = make_thread()

    response = ask(client, thread.id)

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"thread_id", "message_id", "user_message_id", "response", "output", "status", "approval"}
    assert body["approval"] is None
    assert body["status"] == "complete"
    seed = AgentResponse.model_validate(body)
    assert seed.thread_id == thread.id
    for key in ("thread_id", "message_id", "user_message_id"):
        assert_canonical_uuid(body[key])
    assert json.loads(body["response"]) == body["output"]
    assert set(body["output"]) == {"support_advice", "block_card", "risk_level", "follow_up_actions"}
    assert "$1,123.45" in body["output"]["support_advice"]
    assert "John" in body["output"]["support_advice"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"], ids=["none", "curl-d"])
def test_query_with_a_json_body_and_no_json_content_type_is_accepted(client, make_thread, content_type):
    thread = make_thread()
    body = json.dumps({"thread_id": str(thread.id), "query": BALANCE_QUESTION}).encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": QUERY,
        "QUERY_STRING": "",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": FakePayload(body),
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type

    response = client.request(**environ)

    assert response.status_code == 200, response.content
    assert "$1,123.45" in AgentResponse.model_validate(response.json()).response


def test_query_stores_both_messages_complete_with_run_metadata(client, make_thread):
    thread = make_thread()

    body = ask(client, thread.id).json()

    user_message = Message.objects.get(pk=body["user_message_id"])
    assistant = Message.objects.get(pk=body["message_id"])
    assert (user_message.thread_id, user_message.role, user_message.status) == (thread.id, "user", "complete")
    assert user_message.content == BALANCE_QUESTION
    assert (assistant.thread_id, assistant.role, assistant.status) == (thread.id, "assistant", "complete")
    assert assistant.content == body["response"]
    assert assistant.output == body["output"]
    assert assistant.seq == user_message.seq + 1
    assert assistant.metadata["model"] == "demo"
    assert isinstance(assistant.metadata["duration_ms"], int)
    assert assistant.metadata["duration_ms"] >= 0
    usage = assistant.metadata["usage"]
    assert isinstance(usage, dict)
    assert usage
    assert all(isinstance(value, int) for value in usage.values())
    assert assistant.metadata["cost"] is None  # the demo model has no price


def test_query_moves_the_thread_to_the_top_of_the_list(client, make_thread):
    asked, other = make_thread(title="asked"), make_thread(title="other")
    set_updated_at(asked, datetime(2020, 1, 1, tzinfo=UTC))
    assert [item["title"] for item in client.get(THREADS).json()] == ["other", "asked"]

    assert ask(client, asked.id).status_code == 200

    listed = client.get(THREADS).json()
    assert [item["title"] for item in listed] == ["asked", "other"]
    other.refresh_from_db()
    assert assert_utc_timestamp(listed[0]["updated_at"]) > other.updated_at


def test_query_exchange_appears_in_the_thread_detail_in_the_seed_shape(client, make_thread):
    thread = make_thread()
    answer = ask(client, thread.id).json()

    detail = ThreadDetailResponse.model_validate(client.get(f"{THREADS}/{thread.id}").json())

    assert [(m.role, m.content) for m in detail.messages] == [
        ("user", BALANCE_QUESTION),
        ("assistant", answer["response"]),
    ]
    assert [str(m.id) for m in detail.messages] == [answer["user_message_id"], answer["message_id"]]


def test_query_on_a_text_agent_answers_text_with_null_output(client, make_thread):
    thread = make_thread(agent_type="general_chat")

    response = ask(client, thread.id, "Hello there")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["output"] is None
    assert body["response"]
    assert Message.objects.get(pk=body["message_id"]).content == body["response"]


def test_query_answer_carries_status_complete(client, make_thread):
    response = ask(client, make_thread(agent_type="general_chat").id, "Hello there")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "complete"
    assert Message.objects.get(pk=response.json()["message_id"]).status == "complete"


def test_legacy_dialect_key_gets_the_same_blocking_answer_shape(make_thread, user_id):
    _, legacy_key = APIKey.objects.create_key(name="old client", events=APIKey.Events.LEGACY)
    _, standard_key = APIKey.objects.create_key(name="new client")
    answers = {}
    for name, key in {"legacy": legacy_key, "standard": standard_key}.items():
        api = APIClient()
        api.credentials(HTTP_X_API_KEY=key, HTTP_X_USER_ID=str(user_id))
        response = ask(api, make_thread().id)
        assert response.status_code == 200, response.content
        answers[name] = response.json()

    assert set(answers["legacy"]) == set(answers["standard"])
    assert {key: type(value) for key, value in answers["legacy"].items()} == {
        key: type(value) for key, value in answers["standard"].items()
    }
    assert answers["legacy"]["status"] == "complete"
    assert json.loads(answers["legacy"]["response"]) == answers["legacy"]["output"]


def test_cancelled_query_answers_200_with_status_incomplete(client, make_thread, use_model):
    thread = make_thread(agent_type="general_chat")

    async def cancelled_while_answering(messages, info) -> ModelResponse:
        await hub().cancel(thread.pk)  # as a reader of the thread would
        await asyncio.Event().wait()  # the model answers only when stopped
        raise AssertionError("the run was not stopped")

    use_model(cancelled_while_answering)

    response = ask(client, thread.id, "Tell me a long story")

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["response"], body["output"]) == ("incomplete", "", None)
    assert Message.objects.get(pk=body["message_id"]).status == "incomplete"


# Answers being written, and answers whose run died


@pytest.mark.parametrize("read", [detail_messages, listed_messages], ids=["detail", "messages"])
def test_an_answer_whose_run_died_reads_as_failed_run_interrupted_keeping_its_text(client, make_thread, read):
    thread = make_thread(agent_type="general_chat")
    _, answer = start_run(thread, "Tell me a story")
    runs_renew(message_ids=[answer.pk], checkpoints={answer.pk: ("Once upon", None)}, lease_seconds=30)
    lapse(answer)

    question_shown, answer_shown = read(client, thread)

    assert (question_shown["status"], question_shown["content"]) == ("complete", "Tell me a story")
    assert (answer_shown["id"], answer_shown["status"], answer_shown["content"]) == (
        str(answer.pk),
        "failed",
        "Once upon",
    )
    assert answer_shown["metadata"]["error"]["code"] == "run_interrupted"
    assert answer_shown["metadata"]["model"] == "test"
    stored = Message.objects.get(pk=answer.pk)
    assert (stored.status, stored.lease_expires_at) == ("failed", None)
    assert ask(client, thread.id, "Again").status_code == 200


@pytest.mark.parametrize("read", [detail_messages, listed_messages], ids=["detail", "messages"])
def test_an_answer_being_written_reads_as_in_progress_with_its_checkpointed_text(client, make_thread, read):
    thread = make_thread()
    _, answer = start_run(thread, BALANCE_QUESTION)
    partial = {"support_advice": "John, your bal"}
    runs_renew(message_ids=[answer.pk], checkpoints={answer.pk: (json.dumps(partial), partial)}, lease_seconds=30)

    _, answer_shown = read(client, thread)

    assert (answer_shown["status"], answer_shown["content"], answer_shown["output"]) == (
        "in_progress",
        json.dumps(partial),
        partial,
    )
    assert "error" not in answer_shown["metadata"]
    assert Message.objects.get(pk=answer.pk).status == "in_progress"
    assert_error(ask(client, thread.id), 409, "thread_busy")


# Blocking query: what goes wrong


def test_query_on_a_thread_deleted_while_the_model_runs_is_404_and_leaves_nothing_behind(
    client, make_thread, use_model, free_slots
):
    thread = make_thread(agent_type="general_chat")

    async def thread_deleted_meanwhile(messages, info) -> ModelResponse:
        await db(Thread.objects.filter(pk=thread.pk).delete)()
        return ModelResponse(parts=[TextPart("Too late")])

    use_model(thread_deleted_meanwhile)

    response = ask(client, thread.id, "Hello")

    assert_error(response, 404, "not_found")
    assert "Too late" not in response.content.decode()
    assert not Thread.objects.filter(pk=thread.pk).exists()
    assert not Message.objects.exists()


def test_query_whose_lease_another_run_took_over_is_503_run_interrupted(client, make_thread, use_model, free_slots):
    thread = make_thread(agent_type="general_chat")

    def another_run_takes_over() -> None:
        # This run looked dead (its lease lapsed): the next query on the thread takes the lease over.
        Message.objects.filter(thread=thread, status="in_progress").update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        start_run(thread, "Asked again")

    async def taken_over_meanwhile(messages, info) -> ModelResponse:
        await db(another_run_takes_over)()
        return ModelResponse(parts=[TextPart("Too late")])

    use_model(taken_over_meanwhile)

    response = ask(client, thread.id, "Hello")

    assert_error(response, 503, "run_interrupted")
    stored = list(Message.objects.filter(thread=thread).order_by("seq"))
    assert [(m.role, m.status, m.content) for m in stored] == [
        ("user", "complete", "Hello"),
        ("assistant", "failed", ""),
        ("user", "complete", "Asked again"),
        ("assistant", "in_progress", ""),
    ]
    assert stored[1].metadata["error"]["code"] == "run_interrupted"


def test_query_past_run_concurrency_is_503_overloaded_with_retry_after_and_writes_nothing(
    client, make_thread, settings, monkeypatch
):
    settings.RUN_CONCURRENCY = 1
    monkeypatch.setattr(slots, "taken", 1)  # another run holds the process's only slot
    thread = make_thread()
    before = snapshot(thread)

    response = ask(client, thread.id)

    assert_error(response, 503, "overloaded")
    assert int(response["Retry-After"]) >= 1
    assert snapshot(thread) == before
    assert slots.taken == 1


def as_django_raises_it(error: Exception) -> Exception:
    """The error as Django raises it from a connection: wrapped in its own exception class, `error` its cause."""
    try:
        with DatabaseErrorWrapper(SimpleNamespace(Database=psycopg)):
            raise error
    except Exception as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "busy",
    [
        lambda: OperationalError("database is locked"),
        lambda: OperationalError(f"database is locked: {SECRET_SQL}"),
        lambda: PoolTimeout("couldn't get a connection after 10.00 sec"),
        lambda: as_django_raises_it(PoolTimeout("couldn't get a connection after 10.00 sec")),
    ],
    ids=["sqlite locked", "sqlite locked with its statement", "pool timeout", "pool timeout through django"],
)
def test_query_while_the_database_stays_busy_is_503_database_busy_and_writes_nothing(
    client, make_thread, monkeypatch, busy, free_slots
):
    def database_busy(**kwargs: object) -> None:
        raise busy()

    monkeypatch.setattr(runs.lease, "run_begin", database_busy)
    thread = make_thread()
    before = snapshot(thread)

    response = ask(client, thread.id)

    error = assert_error(response, 503, "database_busy")
    assert int(response["Retry-After"]) >= 1
    assert_no_internals(response, error)
    assert snapshot(thread) == before


MODEL_FAILURES = {
    "transport timeout": (lambda: ModelTimeoutError("m", f"timed out {SECRET_BODY}"), 504, "model_timeout"),
    "request deadline": (lambda: ModelRequestTimeout("m", 30.0), 504, "model_timeout"),
    "rate limited": (
        lambda: ModelHTTPError.for_category(ModelRateLimitError, status_code=429, model_name="m", body=SECRET_BODY),
        503,
        "model_unavailable",
    ),
    "unavailable": (
        lambda: ModelHTTPError.for_category(ModelUnavailableError, status_code=503, model_name="m", body=SECRET_BODY),
        503,
        "model_unavailable",
    ),
    "unreachable": (lambda: ModelConnectionError("m", f"refused {SECRET_BODY}"), 503, "model_unavailable"),
    "credentials refused": (
        lambda: ModelHTTPError.for_category(
            ModelAuthenticationError, status_code=401, model_name="m", body=SECRET_BODY
        ),
        503,
        "model_not_configured",
    ),
    "provider error": (
        lambda: ModelHTTPError(status_code=500, model_name="m", body=SECRET_BODY),
        502,
        "model_error",
    ),
}


@pytest.mark.parametrize(("failure", "status", "code"), MODEL_FAILURES.values(), ids=MODEL_FAILURES.keys())
def test_model_failure_answers_its_status_and_saves_a_failed_answer(
    client, make_thread, use_model, failure, status, code, free_slots
):
    def failing(messages, info) -> ModelResponse:
        raise failure()

    use_model(failing)
    thread = make_thread()

    response = ask(client, thread.id)

    error = assert_error(response, status, code)
    assert_no_internals(response, error)
    question, answer = Message.objects.filter(thread=thread).order_by("seq")
    assert (question.role, question.content) == ("user", BALANCE_QUESTION)
    assert (answer.status, answer.metadata["error"]["code"], answer.lease_expires_at) == ("failed", code, None)
    assert SECRET_BODY not in json.dumps(answer.metadata)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (lambda: DatabaseError(f"server closed the connection unexpectedly {SECRET_SQL}"), 500, "internal_error"),
        (lambda: OperationalError("database is locked"), 503, "database_busy"),
    ],
    ids=["connection lost", "locked"],
)
def test_database_error_while_saving_the_answer_is_a_clean_json_error_and_the_question_is_kept(
    client, make_thread, monkeypatch, fault, status, code, free_slots
):
    def saving_fails(**kwargs: object) -> bool:
        raise fault()

    monkeypatch.setattr(runs.lease, "run_finish", saving_fails)
    thread = make_thread()

    response = ask(client, thread.id)

    error = assert_error(response, status, code)
    assert_no_internals(response, error)
    question, answer = Message.objects.filter(thread=thread).order_by("seq")
    assert (question.content, answer.status) == (BALANCE_QUESTION, "in_progress")
    # Its lease is no longer renewed: once it lapses, the answer reads as interrupted and the thread is free.
    lapse(answer)
    shown = client.get(f"{THREADS}/{thread.id}").json()["messages"][1]
    assert (shown["status"], shown["metadata"]["error"]["code"]) == ("failed", "run_interrupted")


def test_an_answer_whose_save_committed_before_the_connection_failed_is_answered_not_interrupted(
    client, make_thread, monkeypatch, free_slots
):
    """The retry after a lost connection finds the answer saved: the caller gets it, and asks nothing twice."""
    attempts = saves_then_drops_the_connection(monkeypatch)
    thread = make_thread()

    response = ask(client, thread.id)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "complete"
    assert attempts == [True, False]
    answer = Message.objects.get(thread=thread, role="assistant")
    assert (str(answer.pk), answer.status) == (response.json()["message_id"], "complete")
