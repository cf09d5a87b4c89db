"""A blocking query costs the same number of SQL queries however long its thread is."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from threads.models import Message

QUESTION = "What is my balance?"


def fill(thread, *, messages: int, model_messages: list) -> None:
    rows = []
    for seq in range(1, messages + 1):
        role = Message.Role.USER if seq % 2 else Message.Role.ASSISTANT
        stored = model_messages if role == Message.Role.ASSISTANT else None
        rows.append(Message(thread=thread, seq=seq, role=role, content="earlier", model_messages=stored))
    Message.objects.bulk_create(rows)
    thread.last_seq = messages
    thread.save(update_fields=["last_seq"])


def query_count(client, thread) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/api/v1/agent/query", {"thread_id": str(thread.id), "query": QUESTION}, format="json")
    assert response.status_code == 200, response.content
    assert "$1,123.45" in response.json()["output"]["support_advice"]
    # Savepoints are the test's transaction wrapping the service's atomic blocks, not queries.
    return sum(1 for query in captured if "SAVEPOINT" not in query["sql"])


@pytest.fixture
def exchange(client, make_thread) -> list:
    """pydantic-ai messages of one real exchange with a tool call, to fill long threads with."""
    thread = make_thread()
    client.post("/api/v1/agent/query", {"thread_id": str(thread.id), "query": QUESTION}, format="json")
    return Message.objects.get(thread=thread, role="assistant").model_messages


def test_query_count_does_not_grow_with_the_thread(client, make_thread, exchange):
    counts = {}
    for size in (0, 10, 1_000):
        thread = make_thread()
        fill(thread, messages=size, model_messages=exchange)
        counts[size] = query_count(client, thread)
    assert counts[0] == counts[10] == counts[1_000], counts
    assert counts[0] <= 10, counts
