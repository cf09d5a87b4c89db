"""A blocking query costs a handful of SQL statements, the same however long its thread is."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from threads.models import Message

QUESTION = "What is my balance?"
MAX_STATEMENTS = 7
"""Take the lease (thread row), read the history, save both messages, bump the thread, read the customer, save
the answer, count what it used to its user's day."""
TRANSACTION_CONTROL = (
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE SAVEPOINT",
    "ROLLBACK TO SAVEPOINT",
    # PostgreSQL: the lease's transaction commits without waiting for the disk (see runs.services.run_begin).
    "SET LOCAL SYNCHRONOUS_COMMIT",
)


def fill(thread, *, messages: int, model_messages: list) -> None:
    rows = []
    for seq in range(1, messages + 1):
        role = Message.Role.USER if seq % 2 else Message.Role.ASSISTANT
        stored = model_messages if role == Message.Role.ASSISTANT else None
        rows.append(Message(thread=thread, seq=seq, role=role, content="earlier", model_messages=stored))
    Message.objects.bulk_create(rows)
    thread.last_seq = messages
    thread.save(update_fields=["last_seq"])


def statements(client, thread) -> list[str]:
    """The SQL a blocking balance question runs, transaction control left out."""
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/api/v1/agent/query", {"thread_id": str(thread.id), "query": QUESTION}, format="json")
    assert response.status_code == 200, response.content
    assert "$1,123.45" in response.json()["output"]["support_advice"]
    return [query["sql"] for query in captured if not query["sql"].lstrip().upper().startswith(TRANSACTION_CONTROL)]


@pytest.fixture
def exchange(client, make_thread, settings) -> list:
    """pydantic-ai messages of one real exchange with a tool call, to fill long threads with.

    Asking it also verifies the API key, which is then remembered for the whole test (as a busy server remembers
    the keys of its clients), so that the counts below are the run's own.
    """
    settings.API_KEY_CACHE_SECONDS = float("inf")
    thread = make_thread()
    client.post("/api/v1/agent/query", {"thread_id": str(thread.id), "query": QUESTION}, format="json")
    return Message.objects.get(thread=thread, role="assistant").model_messages


def listing(sql: list[str]) -> str:
    return "\n".join(f"  {index}. {statement[:300]}" for index, statement in enumerate(sql, 1))


def test_blocking_balance_question_runs_at_most_seven_statements(client, make_thread, exchange):
    sql = statements(client, make_thread())

    assert len(sql) <= MAX_STATEMENTS, f"{len(sql)} statements:\n{listing(sql)}"


def test_blocking_query_runs_the_same_statements_on_threads_of_0_10_and_1000_messages(client, make_thread, exchange):
    counts, runs = {}, {}
    for size in (0, 10, 1_000):
        thread = make_thread()
        fill(thread, messages=size, model_messages=exchange)
        runs[size] = statements(client, thread)
        counts[size] = len(runs[size])

    shown = "\n".join(f"{size} messages, {counts[size]} statements:\n{listing(runs[size])}" for size in runs)
    assert counts[0] == counts[10] == counts[1_000], shown
