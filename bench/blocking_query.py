"""Blocking query benchmark: SQL statements per query by thread length, and latency on the demo model.

Runs in-process through the whole Django stack (middleware, authentication, DRF, runner, database) on a
throwaway test database of whatever DATABASE_URL names (SQLite by default).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bankagent .venv/bin/python bench/blocking_query.py
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "benchmark-only-secret-key")
os.environ["DEMO_MODEL_DELAY_MS"] = "0"
os.environ["AGENT_MODEL"] = "demo"

import django

django.setup()

from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext, setup_test_environment  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from identity.models import APIKey  # noqa: E402
from threads.models import Message, Thread  # noqa: E402

USER_ID = "123e4567-e89b-12d3-a456-426614174000"
QUESTION = "What is my balance?"


def new_thread() -> Thread:
    return Thread.objects.create(user_id=USER_ID, agent_type="bank_support")


def ask(client: APIClient, thread: Thread) -> dict:
    response = client.post("/api/v1/agent/query", {"thread_id": str(thread.id), "query": QUESTION}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def fill(thread: Thread, messages: int, model_messages: list) -> None:
    Message.objects.bulk_create(
        Message(
            thread=thread,
            seq=seq,
            role="user" if seq % 2 else "assistant",
            content="earlier",
            model_messages=None if seq % 2 else model_messages,
        )
        for seq in range(1, messages + 1)
    )
    Thread.objects.filter(pk=thread.pk).update(last_seq=messages)
    thread.refresh_from_db()


def statements(client: APIClient, thread: Thread) -> tuple[int, int]:
    """Queries, and transaction statements (BEGIN/COMMIT) on top of them."""
    with CaptureQueriesContext(connection) as captured:
        ask(client, thread)
    control = sum(1 for query in captured if query["sql"] in ("BEGIN", "COMMIT"))
    return len(captured) - control, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="timed queries (default 200)")
    args = parser.parse_args()

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        _, key = APIKey.objects.create_key(name="bench")
        client = APIClient()
        client.credentials(HTTP_X_API_KEY=key, HTTP_X_USER_ID=USER_ID)

        seed = new_thread()
        ask(client, seed)
        exchange = Message.objects.get(thread=seed, role="assistant").model_messages

        print(f"database: {connection.vendor}")
        for size in (10, 1_000, 10_000):
            thread = new_thread()
            fill(thread, size, exchange)
            queries, control = statements(client, thread)
            print(f"{size:>6} prior messages: {queries} SQL queries per blocking query (+{control} BEGIN/COMMIT)")

        thread = new_thread()
        for _ in range(10):  # warm-up
            ask(client, thread)
        timings = []
        for _ in range(args.runs):
            started = time.perf_counter()
            ask(client, thread)
            timings.append((time.perf_counter() - started) * 1000)
        timings.sort()
        print(
            f"blocking query, demo model, DEMO_MODEL_DELAY_MS=0, {args.runs} runs: "
            f"median {statistics.median(timings):.1f} ms, p90 {timings[int(len(timings) * 0.9)]:.1f} ms, "
            f"min {timings[0]:.1f} ms"
        )
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
