"""Reads: every query on threads and messages, always scoped by the end user."""

import uuid

from django.db.models import QuerySet

from bankagent.exceptions import NotFound
from threads.models import Approval, Message, Thread


def parse_thread_id(raw: str) -> uuid.UUID:
    """A thread id from a URL; one that is not a UUID names no thread."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("Thread not found.") from exc


def thread_get_for_user(*, thread_id: uuid.UUID, user_id: uuid.UUID) -> Thread:
    """The user's thread; another user's thread is indistinguishable from a missing one."""
    try:
        return Thread.objects.get(pk=thread_id, user_id=user_id)
    except Thread.DoesNotExist as exc:
        raise NotFound("Thread not found.") from exc


def thread_list(*, user_id: uuid.UUID, agent_type: str | None = None) -> QuerySet[Thread]:
    threads = Thread.objects.filter(user_id=user_id)
    if agent_type:
        threads = threads.filter(agent_type=agent_type)
    return threads


def message_list(*, thread: Thread) -> QuerySet[Message]:
    return Message.objects.filter(thread=thread).defer("model_messages")


def thread_latest_messages(*, thread: Thread, limit: int = 50) -> tuple[list[Message], bool]:
    """The latest `limit` messages in chronological order, and whether older ones exist."""
    newest_first = list(message_list(thread=thread).order_by("-seq")[: limit + 1])
    return newest_first[:limit][::-1], len(newest_first) > limit


def with_pending_approvals(messages: list[Message]) -> list[Message]:
    """The messages, each answer waiting for the customer's approval with what it waits for (`pending_approval`,
    the first pending one): one query, and none when no answer waits."""
    waiting = [message.pk for message in messages if message.status == Message.Status.AWAITING_APPROVAL]
    found: dict[uuid.UUID, Approval] = {}
    if waiting:
        for approval in Approval.objects.filter(message_id__in=waiting, status=Approval.Status.PENDING):
            found.setdefault(approval.message_id, approval)
    for message in messages:
        message.pending_approval = found.get(message.pk)
    return messages
