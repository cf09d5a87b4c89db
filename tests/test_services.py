"""Unit tests of the thread write services and the thread read selectors (a run's writes: test_run_services.py)."""

import uuid

import pytest
from django.utils import timezone

from bankagent.exceptions import NotFound
from threads import selectors, services
from threads.models import Message, Thread

# message_list, thread_latest_messages


def test_messages_sharing_a_timestamp_keep_their_turn_order(make_thread, make_turn):
    thread = make_thread()
    for index in range(6):
        make_turn(thread, query=f"q{index}")
    Message.objects.filter(thread=thread).update(created_at=timezone.now())

    listed = list(selectors.message_list(thread=thread))
    latest, has_more = selectors.thread_latest_messages(thread=thread, limit=4)

    assert [m.seq for m in listed] == list(range(1, 13))
    assert [m.content for m in listed if m.role == "user"] == [f"q{index}" for index in range(6)]
    assert [m.seq for m in latest] == [9, 10, 11, 12]
    assert has_more is True


def test_thread_latest_messages_without_older_ones_has_no_more(make_thread, make_turn):
    thread = make_thread()
    make_turn(thread, query="only")

    latest, has_more = selectors.thread_latest_messages(thread=thread, limit=2)

    assert [m.seq for m in latest] == [1, 2]
    assert has_more is False


# thread_get_for_user, thread_list, parse_thread_id


def test_thread_get_for_user_returns_the_users_own_thread(make_thread, user_id):
    thread = make_thread()

    assert selectors.thread_get_for_user(thread_id=thread.id, user_id=user_id) == thread


def test_thread_get_for_user_raises_not_found_for_another_users_thread_like_a_missing_one(
    make_thread, user_id, other_user_id
):
    foreign = make_thread(user=other_user_id)

    with pytest.raises(NotFound) as foreign_error:
        selectors.thread_get_for_user(thread_id=foreign.id, user_id=user_id)
    with pytest.raises(NotFound) as missing_error:
        selectors.thread_get_for_user(thread_id=uuid.uuid4(), user_id=user_id)

    assert foreign_error.value.status == 404
    assert foreign_error.value.as_dict() == missing_error.value.as_dict()


def test_thread_list_holds_only_the_users_threads_and_filters_by_agent_type(make_thread, user_id, other_user_id):
    bank, chat = make_thread(), make_thread(agent_type="general_chat")
    make_thread(user=other_user_id)

    assert set(selectors.thread_list(user_id=user_id)) == {bank, chat}
    assert list(selectors.thread_list(user_id=user_id, agent_type="general_chat")) == [chat]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "123",
        "null",
        "../admin",
        "123e4567-e89b-12d3-a456-42661417400",
        "123e4567-e89b-12d3-a456-4266141740000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567-e89b-12d3-a456-426614174000\x00",
    ],
)
def test_parse_thread_id_rejects_non_uuids_as_not_found(raw):
    with pytest.raises(NotFound) as error:
        selectors.parse_thread_id(raw)

    assert error.value.status == 404
    assert error.value.code == "not_found"


def test_parse_thread_id_accepts_any_uuid_spelling():
    expected = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")

    for raw in ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"]:
        assert selectors.parse_thread_id(raw) == expected


# thread_create, thread_update, thread_delete


def test_thread_update_changes_only_the_fields_given_and_none_clears_the_title(make_thread):
    thread = make_thread(title="title", metadata={"a": 1})

    services.thread_update(thread=thread, metadata={"b": 2})
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == ("title", {"b": 2})

    services.thread_update(thread=thread, title=None)
    thread.refresh_from_db()
    assert (thread.title, thread.metadata) == (None, {"b": 2})


def test_thread_delete_removes_its_messages(make_thread, make_turn):
    thread, kept = make_thread(), make_thread()
    make_turn(thread, query="gone")
    make_turn(kept, query="kept")

    services.thread_delete(thread=thread)

    assert list(Message.objects.values_list("content", flat=True).filter(role="user")) == ["kept"]


def test_thread_create_defaults_to_empty_metadata(user_id, db):
    thread = services.thread_create(user_id=user_id, agent_type="general_chat")

    assert Thread.objects.get(pk=thread.pk).metadata == {}
    assert thread.title is None
