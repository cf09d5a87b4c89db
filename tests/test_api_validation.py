"""The contract's "Edge cases, decided": every bad input is refused in the error shape and writes nothing."""

import asyncio
import json
import re
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from channels.testing import ApplicationCommunicator
from django.core import signing
from django.test import Client
from rest_framework.test import APIClient

from bankagent.asgi import application
from bankagent.middleware import ASGIBodyLimit, XFrameOptionsMiddleware
from threads.models import Message, Thread

THREADS = "/api/v1/threads"
QUERY = "/api/v1/agent/query"
LIMIT = 65_536


def counts() -> tuple[int, int]:
    return Thread.objects.count(), Message.objects.count()


def send(client, method: str, path: str, body: str | bytes, content_type: str = "application/json"):
    """A raw body, sent exactly as given."""
    data = body.encode() if isinstance(body, str) else body
    return client.generic(method, path, data=data, content_type=content_type)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    if "details" in error:
        assert isinstance(error["details"], dict)
    return error


def padded_thread_body(size: int, pad_char: str = "x") -> bytes:
    """A valid thread-creation body of exactly `size` bytes, padded with a long metadata string."""
    prefix = b'{"agent_type": "general_chat", "metadata": {"pad": "'
    suffix = b'"}}'
    room = size - len(prefix) - len(suffix)
    width = len(pad_char.encode())
    pad = ("x" * (room % width) + pad_char * (room // width)).encode()
    body = prefix + pad + suffix
    assert len(body) == size
    return body


def with_metadata(metadata: str) -> str:
    """A thread-creation body around a raw JSON metadata fragment."""
    return '{"agent_type": "general_chat", "metadata": ' + metadata + "}"


def utf8_json(value: object) -> bytes:
    """JSON with non-ASCII text as UTF-8 bytes rather than escapes: the smaller body."""
    return json.dumps(value, ensure_ascii=False).encode()


def nested(levels: int, container: str = "dict") -> str:
    """A JSON value `levels` containers deep."""
    opening, closing = ('{"a": ', "}") if container == "dict" else ("[", "]")
    empty = "{}" if container == "dict" else "[]"
    return opening * (levels - 1) + empty + closing * (levels - 1)


def link_cursor(response) -> str:
    match = re.fullmatch(r'<([^>]+)>; rel="next"', response["Link"])
    assert match, response["Link"]
    return parse_qs(urlsplit(match.group(1)).query)["cursor"][0]


# Strict JSON


@pytest.mark.parametrize(
    "body",
    [
        '{"agent_type": "general_chat"',
        '{"agent_type": general_chat}',
        "{'agent_type': 'general_chat'}",
        '{"agent_type": "general_chat",}',
        '{"agent_type": "general_chat"} trailing',
        "{",
        b'{"agent_type": "general_chat", "title": "\xff\xfe"}',  # not UTF-8
    ],
)
def test_malformed_json_is_400_and_writes_nothing(client, body):
    before = counts()

    response = send(client, "POST", THREADS, body)

    assert_error(response, 400, "malformed_json")
    assert counts() == before


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_400_malformed_json(client, constant):
    before = counts()

    response = send(client, "POST", THREADS, '{"agent_type": "general_chat", "metadata": {"x": ' + constant + "}}")

    error = assert_error(response, 400, "malformed_json")
    assert error["message"] == "NaN and Infinity are not JSON numbers."
    assert counts() == before


@pytest.mark.parametrize(
    "number", ["1e999", "-1e999", "1.5e400", str(2**63), str(-(2**63) - 1), str(2**64), "9" * 400, "9" * 5000]
)
def test_overflowing_numbers_are_400_malformed_json(client, number):
    before = counts()

    response = send(client, "POST", THREADS, '{"agent_type": "general_chat", "metadata": {"x": ' + number + "}}")

    error = assert_error(response, 400, "malformed_json")
    assert error["message"].startswith("Numbers must fit in 64 bits")
    assert counts() == before


@pytest.mark.parametrize("number", [str(2**63 - 1), str(-(2**63)), "-0", "1e308"])
def test_numbers_that_fit_in_64_bits_are_accepted(client, number):
    response = send(client, "POST", THREADS, '{"agent_type": "general_chat", "metadata": {"x": ' + number + "}}")

    assert response.status_code == 201, response.content


def test_ordinary_numbers_are_accepted(client):
    body = '{"agent_type": "general_chat", "metadata": {"i": 12345, "f": -0.5, "e": 1e10}}'

    response = send(client, "POST", THREADS, body)

    assert response.status_code == 201, response.content
    assert response.json()["metadata"] == {"i": 12345, "f": -0.5, "e": 1e10}


def test_nesting_of_64_levels_is_accepted(client):
    # The body's own object is level 1, so metadata may hold 63 more.
    body = with_metadata(nested(63))

    response = send(client, "POST", THREADS, body)

    assert response.status_code == 201, response.content
    assert Thread.objects.count() == 1


@pytest.mark.parametrize("container", ["dict", "list"])
def test_nesting_deeper_than_64_is_400_malformed_json(client, container):
    metadata = nested(64) if container == "dict" else '{"a": ' + nested(63, "list") + "}"
    before = counts()

    response = send(client, "POST", THREADS, with_metadata(metadata))

    error = assert_error(response, 400, "malformed_json")
    assert error["message"] == "JSON must not be nested deeper than 64 levels."
    assert counts() == before


def test_very_deep_nesting_is_400_not_a_crash(client):
    before = counts()

    response = send(client, "POST", THREADS, "[" * 20_000 + "]" * 20_000)

    error = assert_error(response, 400, "malformed_json")
    assert error["message"] == "JSON must not be nested deeper than 64 levels."
    assert counts() == before


@pytest.mark.parametrize("body", ["[]", '[{"agent_type": "general_chat"}]', '"general_chat"', "42", "null", "true"])
def test_body_that_is_not_a_json_object_is_400(client, body):
    before = counts()

    response = send(client, "POST", THREADS, body)

    assert_error(response, 400)
    assert counts() == before


def test_body_that_is_not_a_json_object_is_400_on_patch(client, make_thread):
    thread = make_thread(title="Kept")

    response = send(client, "PATCH", f"{THREADS}/{thread.id}", '["title", "Changed"]')

    assert_error(response, 400)
    thread.refresh_from_db()
    assert thread.title == "Kept"


# Content types


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-8",
    ],
)
def test_json_object_body_is_accepted_whatever_the_lenient_content_type(client, content_type):
    response = send(client, "POST", THREADS, '{"agent_type": "general_chat", "title": "t"}', content_type)

    assert response.status_code == 201, response.content
    assert Thread.objects.get().title == "t"


def test_form_fields_are_415_and_write_nothing(client):
    before = counts()

    response = send(client, "POST", THREADS, "agent_type=general_chat&title=t", "application/x-www-form-urlencoded")

    assert_error(response, 415)
    assert counts() == before


def test_multipart_is_415_and_writes_nothing(client):
    before = counts()

    response = client.post(THREADS, {"agent_type": "general_chat", "title": "t"}, format="multipart")

    assert_error(response, 415)
    assert counts() == before


def test_multipart_holding_json_is_still_415(client):
    boundary = "BoUnDaRy"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="data"\r\n\r\n'
        '{"agent_type": "general_chat"}\r\n'
        f"--{boundary}--\r\n"
    )

    response = send(client, "POST", THREADS, body, f"multipart/form-data; boundary={boundary}")

    assert_error(response, 415)
    assert Thread.objects.count() == 0


@pytest.mark.parametrize("content_type", ["application/xml", "text/xml"])
def test_xml_is_415_and_writes_nothing(client, content_type):
    before = counts()

    response = send(client, "POST", THREADS, "<thread><agent_type>general_chat</agent_type></thread>", content_type)

    assert_error(response, 415)
    assert counts() == before


def test_xml_content_type_holding_json_is_still_415(client):
    response = send(client, "POST", THREADS, '{"agent_type": "general_chat"}', "application/xml")

    assert_error(response, 415)
    assert Thread.objects.count() == 0


def test_unsupported_content_type_on_patch_is_415(client, make_thread):
    thread = make_thread(title="Kept")

    response = send(client, "PATCH", f"{THREADS}/{thread.id}", "<title>Changed</title>", "application/xml")

    assert_error(response, 415)
    thread.refresh_from_db()
    assert thread.title == "Kept"


# Body size


def test_body_of_exactly_65536_bytes_is_accepted(client):
    response = send(client, "POST", THREADS, padded_thread_body(LIMIT))

    assert response.status_code == 201, response.content
    assert Thread.objects.count() == 1


def test_body_of_65537_bytes_is_413_payload_too_large(client):
    before = counts()

    response = send(client, "POST", THREADS, padded_thread_body(LIMIT + 1))

    assert_error(response, 413, "payload_too_large")
    assert counts() == before


def test_body_size_counts_bytes_not_characters(client):
    body = padded_thread_body(LIMIT + 1, pad_char="é")
    assert len(body.decode()) < LIMIT

    response = send(client, "POST", THREADS, body)

    assert_error(response, 413, "payload_too_large")
    assert Thread.objects.count() == 0


def test_multibyte_body_of_exactly_65536_bytes_is_accepted(client):
    response = send(client, "POST", THREADS, padded_thread_body(LIMIT, pad_char="é"))

    assert response.status_code == 201, response.content


def test_oversized_body_is_413_before_parsing(client):
    response = send(client, "POST", THREADS, b"{" * (LIMIT + 1))

    assert_error(response, 413, "payload_too_large")


def test_oversized_query_body_is_413_and_writes_nothing(client, make_thread):
    thread = make_thread(agent_type="general_chat")
    prefix = json.dumps({"thread_id": str(thread.id), "query": ""})[:-2]
    body = prefix + "a" * (LIMIT + 1 - len(prefix) - 2) + '"}'
    assert len(body.encode()) == LIMIT + 1
    before = counts()

    response = send(client, "POST", QUERY, body)

    assert_error(response, 413, "payload_too_large")
    assert counts() == before


def test_oversized_patch_is_413_and_changes_nothing(client, make_thread):
    thread = make_thread(title="Kept")
    body = b'{"title": "Changed", "metadata": {"pad": "' + b"x" * LIMIT + b'"}}'

    response = send(client, "PATCH", f"{THREADS}/{thread.id}", body)

    assert_error(response, 413, "payload_too_large")
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("Kept", {})


# NUL and unpaired surrogates


BAD_TEXT = [r"a\u0000b", r"\u0000", r"a\ud800b", r"\udfff", r"\ude00\ud83d"]


@pytest.mark.parametrize("text", BAD_TEXT)
def test_bad_text_in_title_is_400_invalid_text(client, text):
    before = counts()

    response = send(client, "POST", THREADS, '{"agent_type": "general_chat", "title": "' + text + '"}')

    assert_error(response, 400, "invalid_text")
    assert counts() == before


@pytest.mark.parametrize("text", BAD_TEXT)
@pytest.mark.parametrize(
    "metadata",
    ['{"k": "TEXT"}', '{"TEXT": 1}', '{"k": {"deeper": ["ok", "TEXT"]}}', '{"k": [{"TEXT": null}]}'],
    ids=["value", "key", "nested-value", "nested-key"],
)
def test_bad_text_in_metadata_strings_and_keys_is_400_invalid_text(client, text, metadata):
    before = counts()

    response = send(client, "POST", THREADS, with_metadata(metadata.replace("TEXT", text)))

    assert_error(response, 400, "invalid_text")
    assert counts() == before


@pytest.mark.parametrize("text", BAD_TEXT)
def test_bad_text_in_patch_is_400_and_changes_nothing(client, make_thread, text):
    thread = make_thread(title="Kept", metadata={"k": "v"})

    title = send(client, "PATCH", f"{THREADS}/{thread.id}", '{"title": "' + text + '"}')
    metadata = send(client, "PATCH", f"{THREADS}/{thread.id}", '{"title": "ok", "metadata": {"' + text + '": "v"}}')

    assert_error(title, 400, "invalid_text")
    assert_error(metadata, 400, "invalid_text")
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("Kept", {"k": "v"})


@pytest.mark.parametrize("text", BAD_TEXT)
def test_bad_text_in_query_is_400_invalid_text(client, make_thread, text):
    thread = make_thread(agent_type="general_chat")
    before = counts()

    response = send(client, "POST", QUERY, f'{{"thread_id": "{thread.id}", "query": "hello {text}"}}')

    assert_error(response, 400, "invalid_text")
    assert counts() == before


def test_paired_surrogate_escapes_are_ordinary_text(client):
    response = send(client, "POST", THREADS, r'{"agent_type": "general_chat", "title": "\ud83d\ude00 ok"}')

    assert response.status_code == 201, response.content
    assert Thread.objects.get().title == "😀 ok"


# Title length


@pytest.mark.parametrize("char", ["é", "😀"])
def test_title_of_200_code_points_is_accepted(client, char):
    # json.dumps escapes 😀 as a surrogate pair: 400 UTF-16 units and 800 UTF-8 bytes, but 200 code points.
    response = send(client, "POST", THREADS, json.dumps({"agent_type": "general_chat", "title": char * 200}))

    assert response.status_code == 201, response.content
    assert response.json()["title"] == char * 200
    assert Thread.objects.get().title == char * 200


@pytest.mark.parametrize("char", ["é", "😀", "a"])
def test_title_over_200_code_points_is_422(client, char):
    before = counts()

    response = send(client, "POST", THREADS, json.dumps({"agent_type": "general_chat", "title": char * 201}))

    assert_error(response, 422)
    assert counts() == before


def test_title_over_200_code_points_on_patch_is_422(client, make_thread):
    thread = make_thread(title="Kept")

    response = send(client, "PATCH", f"{THREADS}/{thread.id}", json.dumps({"title": "é" * 201}))

    assert_error(response, 422)
    thread.refresh_from_db()
    assert thread.title == "Kept"


def test_title_of_200_code_points_on_patch_is_accepted(client, make_thread):
    thread = make_thread(title="Old")

    response = send(client, "PATCH", f"{THREADS}/{thread.id}", json.dumps({"title": "😀" * 200}))

    assert response.status_code == 200, response.content
    thread.refresh_from_db()
    assert thread.title == "😀" * 200


@pytest.mark.parametrize("title", [42, ["a"], {"a": 1}, True])
def test_title_that_is_not_a_string_is_422(client, title):
    response = send(client, "POST", THREADS, json.dumps({"agent_type": "general_chat", "title": title}))

    assert_error(response, 422)
    assert Thread.objects.count() == 0


@pytest.mark.parametrize("metadata", [[], "text", 1, True])
def test_metadata_that_is_not_an_object_is_422(client, metadata):
    response = send(client, "POST", THREADS, json.dumps({"agent_type": "general_chat", "metadata": metadata}))

    assert_error(response, 422)
    assert Thread.objects.count() == 0


# Query


@pytest.fixture
def chat_thread(make_thread) -> Thread:
    return make_thread(agent_type="general_chat")


@pytest.mark.parametrize("query", ["", " ", "   \n\t  ", "\u3000"])
def test_empty_or_blank_query_is_422(client, chat_thread, query):
    before = counts()

    response = client.post(QUERY, {"thread_id": str(chat_thread.id), "query": query}, format="json")

    assert_error(response, 422)
    assert counts() == before


@pytest.mark.parametrize("query", [42, 4.2, True, None, ["hello"], {"text": "hello"}])
def test_query_that_is_not_a_string_is_422(client, chat_thread, query):
    before = counts()

    response = client.post(QUERY, {"thread_id": str(chat_thread.id), "query": query}, format="json")

    assert_error(response, 422)
    assert counts() == before


def test_missing_query_is_422(client, chat_thread):
    response = client.post(QUERY, {"thread_id": str(chat_thread.id)}, format="json")

    assert_error(response, 422)
    assert Message.objects.count() == 0


def test_query_of_8000_characters_is_answered(client, chat_thread):
    response = client.post(QUERY, {"thread_id": str(chat_thread.id), "query": "a" * 8_000}, format="json")

    assert response.status_code == 200, response.content
    assert Message.objects.get(pk=response.json()["user_message_id"]).content == "a" * 8_000
    assert Message.objects.filter(thread=chat_thread).count() == 2


def test_query_of_8000_code_points_is_answered(client, make_thread):
    thread = make_thread(agent_type="bank_support")
    query = "😀" * 8_000  # 16,000 UTF-16 units, 32,000 UTF-8 bytes

    response = send(client, "POST", QUERY, utf8_json({"thread_id": str(thread.id), "query": query}))

    assert response.status_code == 200, response.content
    assert Message.objects.get(pk=response.json()["user_message_id"]).content == query


def test_query_length_is_counted_after_stripping(client, chat_thread):
    query = "  \n" + "a" * 8_000 + "\t "

    response = client.post(QUERY, {"thread_id": str(chat_thread.id), "query": query}, format="json")

    assert response.status_code == 200, response.content
    assert Message.objects.get(pk=response.json()["user_message_id"]).content == "a" * 8_000


@pytest.mark.parametrize("query", ["a" * 8_001, "é" * 8_001, "😀" * 8_001])
def test_query_of_8001_characters_is_422_query_too_long(client, chat_thread, query):
    before = counts()

    response = send(client, "POST", QUERY, utf8_json({"thread_id": str(chat_thread.id), "query": query}))

    assert_error(response, 422, "query_too_long")
    assert counts() == before


# agent_type


@pytest.mark.parametrize("agent_type", ["no_such_agent", "BANK_SUPPORT", "bank-support"])
def test_unknown_agent_type_is_422_listing_the_known_ones(client, agent_type):
    response = client.post(THREADS, {"agent_type": agent_type}, format="json")

    error = assert_error(response, 422)
    listed = json.dumps(error.get("details", {}))
    assert "bank_support" in listed
    assert "general_chat" in listed
    assert Thread.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [{}, {"agent_type": None}, {"agent_type": 1}, {"agent_type": ["bank_support"]}, {"agent_type": ""}],
    ids=["missing", "null", "number", "list", "blank"],
)
def test_missing_or_non_string_agent_type_is_422(client, body):
    response = client.post(THREADS, body, format="json")

    assert_error(response, 422)
    assert Thread.objects.count() == 0


# Read-only fields and ownership


def test_patch_ignores_read_only_fields(client, make_thread, other_user_id, user_id):
    thread = make_thread(title="Old")
    created_at, agent_type = thread.created_at, thread.agent_type
    body = {
        "id": str(uuid.uuid4()),
        "user_id": str(other_user_id),
        "agent_type": "general_chat",
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
        "title": "New",
    }

    response = client.patch(f"{THREADS}/{thread.id}", body, format="json")

    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["id"], data["user_id"], data["agent_type"], data["title"]) == (
        str(thread.id),
        str(user_id),
        agent_type,
        "New",
    )
    assert not data["created_at"].startswith("2000") and not data["updated_at"].startswith("2000")
    assert Thread.objects.count() == 1
    thread.refresh_from_db()
    assert (thread.user_id, thread.agent_type, thread.created_at, thread.title) == (
        user_id,
        agent_type,
        created_at,
        "New",
    )


def test_patch_with_only_read_only_fields_changes_nothing(client, make_thread, user_id, other_user_id):
    thread = make_thread(title="Kept", metadata={"k": "v"})

    response = client.patch(
        f"{THREADS}/{thread.id}", {"user_id": str(other_user_id), "agent_type": "general_chat"}, format="json"
    )

    assert response.status_code == 200, response.content
    thread.refresh_from_db()
    assert (thread.user_id, thread.agent_type, thread.title, thread.metadata) == (
        user_id,
        "bank_support",
        "Kept",
        {"k": "v"},
    )


def test_body_user_id_never_moves_a_thread_to_another_user(client, api_key, make_thread, other_user_id):
    thread = make_thread()
    client.patch(f"{THREADS}/{thread.id}", {"user_id": str(other_user_id)}, format="json")
    other = APIClient()
    other.credentials(HTTP_X_API_KEY=api_key, HTTP_X_USER_ID=str(other_user_id))

    assert other.get(f"{THREADS}/{thread.id}").status_code == 404
    assert other.get(THREADS).json() == []
    assert client.get(f"{THREADS}/{thread.id}").status_code == 200


def test_body_user_id_is_ignored_on_create(client, user_id, other_user_id):
    response = client.post(THREADS, {"agent_type": "general_chat", "user_id": str(other_user_id)}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["user_id"] == str(user_id)
    assert Thread.objects.get().user_id == user_id


def test_body_user_id_does_not_reach_another_users_thread_by_query(client, make_thread, other_user_id):
    foreign = make_thread(user=other_user_id, agent_type="general_chat")

    response = client.post(
        QUERY, {"thread_id": str(foreign.id), "query": "hello", "user_id": str(other_user_id)}, format="json"
    )

    assert_error(response, 404, "not_found")
    assert Message.objects.count() == 0


def test_title_null_clears_the_title(client, make_thread):
    thread = make_thread(title="Old")

    response = client.patch(f"{THREADS}/{thread.id}", {"title": None}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["title"] is None
    thread.refresh_from_db()
    assert thread.title is None


def test_patch_without_title_keeps_the_title(client, make_thread):
    thread = make_thread(title="Kept")

    response = client.patch(f"{THREADS}/{thread.id}", {"metadata": {"k": 1}}, format="json")

    assert response.status_code == 200, response.content
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("Kept", {"k": 1})


# Pagination parameters


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5", "", "1e2", "10abc", "99999999999999999999"])
def test_bad_limit_on_threads_is_400_invalid_limit(client, make_thread, limit):
    make_thread()

    response = client.get(THREADS, {"limit": limit})

    assert_error(response, 400, "invalid_limit")


@pytest.mark.parametrize("limit", ["0", "101", "abc"])
def test_bad_limit_on_messages_is_400_invalid_limit(client, make_thread, limit):
    thread = make_thread()

    response = client.get(f"{THREADS}/{thread.id}/messages", {"limit": limit})

    assert_error(response, 400, "invalid_limit")


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limit_bounds_are_accepted(client, make_thread, limit):
    thread = make_thread()

    assert client.get(THREADS, {"limit": limit}).status_code == 200
    assert client.get(f"{THREADS}/{thread.id}/messages", {"limit": limit}).status_code == 200


def _forged_cursor() -> str:
    return signing.dumps(["2030-01-01 00:00:00+00:00", str(uuid.uuid4())], key="not-the-server-secret")


@pytest.mark.parametrize("cursor", ["", "abc", "eyJ4IjoxfQ", "a:b:c", "null"])
def test_garbage_cursor_is_400_invalid_cursor(client, make_thread, cursor):
    thread = make_thread()

    assert_error(client.get(THREADS, {"cursor": cursor}), 400, "invalid_cursor")
    assert_error(client.get(f"{THREADS}/{thread.id}/messages", {"cursor": cursor}), 400, "invalid_cursor")


def test_cursor_signed_with_another_key_is_400_invalid_cursor(client, make_thread):
    make_thread()

    response = client.get(THREADS, {"cursor": _forged_cursor()})

    assert_error(response, 400, "invalid_cursor")


def _thread_cursor(client, make_thread) -> str:
    for _ in range(3):
        make_thread()
    first = client.get(THREADS, {"limit": 1})
    assert first.status_code == 200
    return link_cursor(first)


def test_genuine_cursor_is_accepted(client, make_thread):
    cursor = _thread_cursor(client, make_thread)

    response = client.get(THREADS, {"cursor": cursor, "limit": 1})

    assert response.status_code == 200
    assert len(response.json()) == 1


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampered_cursor_is_400_invalid_cursor(client, make_thread, position):
    cursor = _thread_cursor(client, make_thread)
    index = position % len(cursor)
    tampered = cursor[:index] + ("A" if cursor[index] != "A" else "B") + cursor[index + 1 :]

    response = client.get(THREADS, {"cursor": tampered, "limit": 1})

    assert_error(response, 400, "invalid_cursor")


def test_thread_cursor_is_refused_on_messages_and_back(client, make_thread):
    thread_cursor = _thread_cursor(client, make_thread)
    thread = Thread.objects.first()
    Message.objects.bulk_create(Message(thread=thread, seq=seq, role="user", content=f"m{seq}") for seq in (1, 2, 3))
    page = client.get(f"{THREADS}/{thread.id}/messages", {"limit": 1})
    message_cursor = link_cursor(page)

    assert_error(client.get(f"{THREADS}/{thread.id}/messages", {"cursor": thread_cursor}), 400, "invalid_cursor")
    assert_error(client.get(THREADS, {"cursor": message_cursor}), 400, "invalid_cursor")


# Paths, methods, hosts, Accept


@pytest.mark.parametrize(
    "path", ["/api/v1/nothing", "/api/nothing", "/api/v2/threads", "/api/v1/threads/", "/api/v1/agents/x/y", "/api/"]
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_api_path_is_404_json(client, path, method):
    before = counts()

    response = send(client, method, path, '{"agent_type": "general_chat"}')

    assert_error(response, 404)
    assert counts() == before


def test_unknown_api_path_is_404_json_without_a_key(anonymous, db):
    assert_error(anonymous.get("/api/v1/nothing"), 404)
    assert_error(anonymous.post("/api/v1/nothing", {}, format="json"), 404)


def test_unknown_sub_path_of_a_thread_is_404_json(client, make_thread):
    thread = make_thread()

    assert_error(client.get(f"{THREADS}/{thread.id}/nothing"), 404)


@pytest.mark.parametrize("method", ["PUT", "TRACE", "DELETE", "PATCH"])
def test_unsupported_method_on_threads_is_405_json(client, method):
    before = counts()

    response = send(client, method, THREADS, '{"agent_type": "general_chat"}')

    assert_error(response, 405)
    assert counts() == before


@pytest.mark.parametrize("method", ["PUT", "TRACE", "POST"])
def test_unsupported_method_on_a_thread_is_405_json(client, make_thread, method):
    thread = make_thread(title="Kept")

    response = send(client, method, f"{THREADS}/{thread.id}", '{"title": "Changed"}')

    assert_error(response, 405)
    thread.refresh_from_db()
    assert thread.title == "Kept"


@pytest.mark.parametrize("path", [THREADS, "/api/v1/health", "/api/v1/nothing"])
def test_host_outside_allowed_hosts_is_400_bad_host(client, path):
    response = client.get(path, HTTP_HOST="evil.example.com")

    assert_error(response, 400, "bad_host")


def test_host_outside_allowed_hosts_writes_nothing(client):
    response = client.post(THREADS, {"agent_type": "general_chat"}, format="json", HTTP_HOST="evil.example.com")

    assert_error(response, 400, "bad_host")
    assert counts() == (0, 0)


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "text/html,application/xhtml+xml;q=0.9", "*/*"])
def test_responses_are_json_whatever_accept_asks_for(client, make_thread, accept):
    make_thread()

    ok = client.get(THREADS, HTTP_ACCEPT=accept)
    missing = client.get(f"{THREADS}/{uuid.uuid4()}", HTTP_ACCEPT=accept)
    unknown = client.get("/api/v1/nothing", HTTP_ACCEPT=accept)
    invalid = client.post(THREADS, {"agent_type": "nope"}, format="json", HTTP_ACCEPT=accept)

    assert ok.status_code == 200
    assert ok["Content-Type"].startswith("application/json")
    assert len(ok.json()) == 1
    assert_error(missing, 404)
    assert_error(unknown, 404)
    assert_error(invalid, 422)


@pytest.mark.parametrize("accept", ["text/html", "application/xml"])
def test_unauthenticated_error_is_json_whatever_accept_asks_for(anonymous, db, accept):
    assert_error(anonymous.get(THREADS, HTTP_ACCEPT=accept), 401)


@pytest.mark.parametrize("fmt", ["api", "html", "xml"])
def test_format_parameter_does_not_select_a_browsable_api(client, fmt):
    response = client.get(THREADS, {"format": fmt})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == []


# The ASGI body limit, driven directly


class FakeApp:
    """Reads the whole body the way Django would, and answers 200 with it."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/threads",
        "raw_path": b"/api/v1/threads",
        "query_string": b"",
        "headers": headers or [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 12345),
        "server": ("localhost", 80),
    }


async def drive(app, chunks: list[bytes], headers=None) -> tuple[list[dict], int]:
    """Feed `chunks` as http.request messages; answer what the app sent and how many messages it read."""
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # a client that sends nothing more

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(ASGIBodyLimit(app)(http_scope(headers), receive, send), timeout=5)
    return sent, reads


def assert_413(sent: list[dict]) -> None:
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"application/json")
    body = b"".join(message.get("body", b"") for message in sent[1:])
    assert json.loads(body)["error"]["code"] == "payload_too_large"


async def test_asgi_chunked_body_over_the_limit_is_413_without_calling_the_app():
    app = FakeApp()
    chunks = [b"x" * 16_384] * 4 + [b"x"]  # 65,537 bytes, no content-length

    sent, _ = await drive(app, chunks)

    assert_413(sent)
    assert not app.called


async def test_asgi_chunked_body_stops_being_read_once_over_the_limit():
    app = FakeApp()
    chunks = [b"x" * 10_000] * 100  # a megabyte on its way

    sent, reads = await drive(app, chunks)

    assert_413(sent)
    assert not app.called
    assert reads <= 7


async def test_asgi_chunked_body_of_exactly_the_limit_reaches_the_app_intact():
    app = FakeApp()
    body = bytes(range(256)) * (LIMIT // 256)
    chunks = [body[start : start + 10_000] for start in range(0, LIMIT, 10_000)]
    assert len(body) == LIMIT and len(chunks) > 1

    sent, _ = await drive(app, chunks)

    assert app.called
    assert app.body == body
    assert sent[0]["status"] == 200


async def test_asgi_small_single_message_body_reaches_the_app_intact():
    app = FakeApp()

    sent, _ = await drive(app, [b'{"agent_type": "general_chat"}'])

    assert app.body == b'{"agent_type": "general_chat"}'
    assert sent[0]["status"] == 200


async def test_asgi_declared_content_length_over_the_limit_is_413_before_reading():
    app = FakeApp()
    headers = [(b"host", b"localhost"), (b"content-length", str(LIMIT + 1).encode())]

    sent, reads = await drive(app, [b"x" * 100], headers=headers)

    assert_413(sent)
    assert not app.called
    assert reads == 0


async def test_asgi_empty_body_reaches_the_app():
    app = FakeApp()

    sent, _ = await drive(app, [b""])

    assert app.called and app.body == b""
    assert sent[0]["status"] == 200


async def test_asgi_application_refuses_a_chunked_body_over_the_limit():
    """The deployed ASGI application, not only the middleware, counts chunked bodies."""
    communicator = ApplicationCommunicator(application, http_scope())
    for _ in range(4):
        await communicator.send_input({"type": "http.request", "body": b"x" * 16_384, "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b"x", "more_body": True})

    start = await communicator.receive_output(timeout=5)
    body = await communicator.receive_output(timeout=5)

    assert start["status"] == 413
    assert json.loads(body["body"])["error"]["code"] == "payload_too_large"
    await communicator.wait(timeout=5)


@pytest.mark.django_db(transaction=True)
async def test_asgi_application_reads_a_chunked_body_within_the_limit(api_key):
    """A body sent without Content-Length is counted, then parsed whole, not taken for an empty one."""
    headers = [(b"host", b"localhost"), (b"x-api-key", api_key.encode()), (b"x-user-id", str(uuid.uuid4()).encode())]
    communicator = ApplicationCommunicator(application, http_scope(headers))
    await communicator.send_input({"type": "http.request", "body": b'{"agent_type": ', "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b'"general_chat"}', "more_body": False})

    start = await communicator.receive_output(timeout=5)
    body = await communicator.receive_output(timeout=5)

    assert start["status"] == 201, body
    assert json.loads(body["body"])["agent_type"] == "general_chat"
    await communicator.wait(timeout=5)


def test_failure_outside_the_views_is_the_contracts_json_500_without_its_details(monkeypatch):
    def broken(self, request, response):
        raise RuntimeError("secret detail of a middleware failure")

    monkeypatch.setattr(XFrameOptionsMiddleware, "process_response", broken)
    client = Client(raise_request_exception=False)

    response = client.get("/api/v1/health")

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "internal_error"
    assert b"secret" not in response.content
