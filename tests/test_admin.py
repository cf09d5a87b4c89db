"""The Django admin pages for threads, messages, API keys and customers render for a superuser."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from bank.models import DEMO_USER_ID, Customer
from identity.models import APIKey
from tests.conftest import admin_rename, finished_turn
from threads.models import Message, Thread


@pytest.fixture
def conversation(make_thread, make_turn) -> Thread:
    """A thread of three finished turns whose timestamps run backwards, so only `seq` orders them."""
    thread = make_thread(title="Lost card conversation")
    now = timezone.now()
    for index, prompt in enumerate(["alpha question", "beta question", "gamma question"]):
        make_turn(
            thread,
            query=prompt,
            answer=f"{prompt.split()[0]} answer",
            metadata={"model": "demo", "duration_ms": 4321 + index, "usage": {"total_tokens": 17}},
        )
    for message in Message.objects.filter(thread=thread):
        Message.objects.filter(pk=message.pk).update(created_at=now - timedelta(minutes=message.seq))
    return thread


def test_admin_needs_a_staff_login(db):
    response = Client().get("/admin/threads/thread/")

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_thread_changelist_renders_with_the_threads(admin_client, conversation, make_thread, other_user_id):
    make_thread(user=other_user_id, agent_type="general_chat", title="Poem request")

    response = admin_client.get("/admin/threads/thread/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "Lost card conversation" in content
    assert "Poem request" in content


def test_thread_changelist_filters_by_agent_type(admin_client, conversation, make_thread, other_user_id):
    make_thread(user=other_user_id, agent_type="general_chat", title="Poem request")

    response = admin_client.get("/admin/threads/thread/", {"agent_type__exact": "general_chat"})

    assert response.status_code == 200
    content = response.content.decode()
    assert "Poem request" in content
    assert "Lost card conversation" not in content


@pytest.mark.parametrize("spelling", [str, lambda user: str(user).upper()], ids=["canonical", "upper"])
def test_thread_changelist_searches_by_user_id(admin_client, conversation, make_thread, other_user_id, spelling):
    make_thread(user=other_user_id, agent_type="general_chat", title="Poem request")

    response = admin_client.get("/admin/threads/thread/", {"q": spelling(other_user_id)})

    assert response.status_code == 200
    content = response.content.decode()
    assert "Poem request" in content
    assert "Lost card conversation" not in content


def test_thread_changelist_searches_by_title(admin_client, conversation, make_thread, other_user_id):
    make_thread(user=other_user_id, agent_type="general_chat", title="Poem request")

    response = admin_client.get("/admin/threads/thread/", {"q": "lost card"})

    assert response.status_code == 200
    content = response.content.decode()
    assert "Lost card conversation" in content
    assert "Poem request" not in content


def test_thread_change_page_shows_its_messages_inline_in_chronological_order(admin_client, conversation):
    response = admin_client.get(f"/admin/threads/thread/{conversation.pk}/change/")

    assert response.status_code == 200
    content = response.content.decode()
    assert str(DEMO_USER_ID) in content
    expected = [
        "alpha question",
        "alpha answer",
        "beta question",
        "beta answer",
        "gamma question",
        "gamma answer",
    ]
    positions = [content.find(text) for text in expected]
    assert -1 not in positions, dict(zip(expected, positions, strict=True))
    assert positions == sorted(positions)


def test_message_changelist_renders(admin_client, conversation):
    response = admin_client.get("/admin/threads/message/")

    assert response.status_code == 200
    assert "Lost card conversation" in response.content.decode()


def test_message_changelist_filters_by_role(admin_client, conversation):
    response = admin_client.get("/admin/threads/message/", {"role__exact": "assistant"})

    assert response.status_code == 200
    assert "3 messages" in response.content.decode()


def test_message_change_page_shows_its_metadata(admin_client, conversation):
    message = Message.objects.get(thread=conversation, seq=2)

    response = admin_client.get(f"/admin/threads/message/{message.pk}/change/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "duration_ms" in content
    assert "4321" in content
    assert "total_tokens" in content
    assert "alpha answer" in content


def test_api_key_changelist_lists_the_keys(admin_client, api_key):
    response = admin_client.get("/admin/identity/apikey/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "tests" in content
    assert api_key not in content


def test_api_key_add_page_renders(admin_client):
    response = admin_client.get("/admin/identity/apikey/add/")

    assert response.status_code == 200
    assert 'name="name"' in response.content.decode()


def test_api_key_changelist_filters_by_event_dialect(admin_client, api_key):
    APIKey.objects.create_key(name="old client", events=APIKey.Events.LEGACY)

    response = admin_client.get("/admin/identity/apikey/", {"events__exact": "legacy"})

    assert response.status_code == 200
    content = response.content.decode()
    assert "old client" in content
    assert ">tests<" not in content


def test_the_librarys_own_api_key_admin_is_not_listed(admin_client):
    assert admin_client.get("/admin/rest_framework_api_key/apikey/").status_code == 404
    assert "/admin/identity/apikey/" in admin_client.get("/admin/").content.decode()


def test_customer_changelist_lists_the_seeded_demo_customer(admin_client):
    response = admin_client.get("/admin/bank/customer/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "John" in content
    assert str(DEMO_USER_ID) in content


def test_customer_change_page_shows_the_demo_customer_with_cards_and_transactions(admin_client):
    john = Customer.objects.get(user_id=DEMO_USER_ID)

    response = admin_client.get(f"/admin/bank/customer/{john.pk}/change/")

    assert response.status_code == 200
    content = response.content.decode()
    assert "John" in content
    assert "1123.45" in content
    assert "4242" in content
    assert "Corner Coffee" in content


def test_saving_a_thread_in_the_admin_writes_only_what_it_edits_not_the_turns_a_run_took_meanwhile(
    admin_client, make_thread
):
    thread = make_thread(title="Before")

    saved = admin_rename(
        admin_client, thread, "After", meanwhile=lambda: finished_turn(thread, query="Asked meanwhile")
    )

    assert saved.status_code == 302
    thread.refresh_from_db()
    assert (thread.title, thread.last_seq) == ("After", 2)
    finished_turn(thread, query="And the next question")  # numbered after the run, as the database has it
    assert list(Message.objects.filter(thread=thread).values_list("seq", flat=True)) == [1, 2, 3, 4]


def test_an_answer_page_shows_what_it_asked_to_approve_and_the_tools_it_used(admin_client, make_thread, demo_customer):
    from asgiref.sync import async_to_sync

    from runs.runner import run_blocking

    thread = make_thread()
    turn = async_to_sync(run_blocking)(user_id=thread.user_id, thread_id=thread.pk, query="I lost my card")

    page = admin_client.get(f"/admin/threads/message/{turn.assistant_message.pk}/change/").content.decode()
    customer = admin_client.get(f"/admin/bank/customer/{demo_customer.pk}/change/").content.decode()

    assert "awaiting approval" in page and "block_card" in page and "pending" in page
    assert "Blocked at" in customer
