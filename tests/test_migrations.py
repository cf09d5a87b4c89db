"""The migrations that moved the bank's models to `bank`, the profile to `identity` and API keys to
`identity.APIKey` keep an existing database's rows, content types and keys: these tests migrate back to before
the moves, write there as the old code did, and migrate forward again."""

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import StateApps
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_api_key.models import APIKey as StockAPIKey

from bank.models import DEMO_USER_ID, Customer
from identity.models import APIKey, Profile
from runs.services import INTERRUPTED
from threads.models import Message

Migrate = Callable[[list[tuple[str, str | None]]], StateApps]
BEFORE_THE_MOVES = [("identity", None), ("bank", None)]
JANE = uuid.UUID("00000000-0000-4000-8000-000000000009")


@pytest.fixture
def migrate(transactional_db) -> Iterator[Migrate]:
    """Migrate the test database to some targets and get their models there."""

    def to(targets: list[tuple[str, str | None]]) -> StateApps:
        return MigrationExecutor(connection).migrate(targets).apps

    yield to
    migrate_to_the_end()  # the test database's flush needs the current tables, even after a failed test


def migrate_to_the_end() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def tables() -> set[str]:
    return set(connection.introspection.table_names())


def test_a_fresh_database_has_the_demo_customer(db):
    john = Customer.objects.get(user_id=DEMO_USER_ID)

    assert (john.name, str(john.balance)) == ("John", "1123.45")
    assert [card.last4 for card in john.cards.all()] == ["4242"]
    assert john.transactions.count() == 5


def test_a_key_created_before_the_migration_still_authenticates_after_it(migrate):
    migrate(BEFORE_THE_MOVES)
    assert "identity_apikey" not in tables()
    expiry = timezone.now() + timedelta(days=30)
    stock, raw = StockAPIKey.objects.create_key(name="partner", expiry_date=expiry)
    StockAPIKey.objects.filter(pk=stock.pk).update(created=timezone.now() - timedelta(days=400))
    stock.refresh_from_db()

    migrate_to_the_end()

    key = APIKey.objects.get_from_key(raw)
    assert (key.pk, key.prefix, key.hashed_key, key.name) == (stock.pk, stock.prefix, stock.hashed_key, "partner")
    assert (key.created, key.expiry_date, key.revoked, key.events) == (stock.created, expiry, False, "standard")
    assert not StockAPIKey.objects.exists()
    api = APIClient()
    api.credentials(HTTP_X_API_KEY=raw, HTTP_X_USER_ID=str(DEMO_USER_ID))
    assert api.get("/api/v1/threads").status_code == 200


def test_a_revoked_key_stays_revoked_across_the_migration(migrate):
    migrate(BEFORE_THE_MOVES)
    _, raw = StockAPIKey.objects.create_key(name="leaked", revoked=True)

    migrate_to_the_end()

    assert APIKey.objects.get(name="leaked").revoked
    assert not APIKey.objects.is_valid(raw)


def test_migrating_back_returns_the_keys_to_the_librarys_table(migrate):
    _, raw = APIKey.objects.create_key(name="old client", events=APIKey.Events.LEGACY)

    migrate(BEFORE_THE_MOVES)

    assert StockAPIKey.objects.is_valid(raw)
    migrate_to_the_end()
    assert APIKey.objects.get_from_key(raw).events == "standard"  # the stock table has no dialect to keep


def test_customers_and_profiles_keep_their_rows_and_content_types(migrate):
    old = migrate(BEFORE_THE_MOVES)
    assert {"agents_customer", "agents_card", "agents_transaction", "chat_profile"} <= tables()
    customer_type = ContentType.objects.get(app_label="agents", model="customer")
    profile_type = ContentType.objects.get(app_label="chat", model="profile")
    jane = old.get_model("agents", "Customer").objects.create(user_id=JANE, name="Jane")
    old.get_model("agents", "Card").objects.create(customer=jane, last4="1881")
    login = User.objects.create_user("jane")
    old.get_model("chat", "Profile").objects.create(login_id=login.pk, user_id=JANE)

    migrate_to_the_end()

    assert {"bank_customer", "bank_card", "bank_transaction", "identity_profile"} <= tables()
    assert not {"agents_customer", "agents_card", "agents_transaction", "chat_profile"} & tables()
    assert Customer.objects.get(pk=jane.pk).cards.get().last4 == "1881"
    assert Profile.objects.get(login=login).user_id == JANE
    assert ContentType.objects.get(app_label="bank", model="customer").pk == customer_type.pk
    assert ContentType.objects.get(app_label="identity", model="profile").pk == profile_type.pk
    assert not ContentType.objects.filter(app_label__in=["agents", "chat"]).exists()


def test_two_answers_in_progress_on_a_thread_keep_the_latest_when_the_rule_becomes_the_databases(migrate):
    old = migrate([("threads", "0003_run_lease_on_message")])
    OldThread, OldMessage = old.get_model("threads", "Thread"), old.get_model("threads", "Message")
    thread = OldThread.objects.create(user_id=JANE, agent_type="general_chat", last_seq=4)
    lease = timezone.now() + timedelta(seconds=30)
    for seq, role in enumerate(["user", "assistant", "user", "assistant"], 1):
        status = "in_progress" if role == "assistant" else "complete"
        OldMessage.objects.create(
            thread_id=thread.pk, seq=seq, role=role, status=status, lease_expires_at=lease, metadata={"model": "m"}
        )

    migrate_to_the_end()

    answers = Message.objects.filter(thread_id=thread.pk, role="assistant").order_by("seq")
    earlier, latest = answers
    assert (earlier.status, earlier.lease_expires_at, earlier.metadata) == (
        "failed",
        None,
        {"model": "m", "error": INTERRUPTED},
    )
    assert (latest.status, latest.lease_expires_at) == ("in_progress", lease)
