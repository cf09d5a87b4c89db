"""The run's reads."""

import uuid
from dataclasses import dataclass
from datetime import datetime
from itertools import chain

from django.db.models import Q
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter

from bankagent.exceptions import NotFound
from bankagent.jsontypes import JSONObject
from threads.models import Approval, Message


@dataclass(frozen=True)
class Running:
    """The answer being written on a thread (its lease), or waiting for the customer's approval."""

    message_id: uuid.UUID
    lease_expires_at: datetime | None
    metadata: JSONObject
    status: str = Message.Status.IN_PROGRESS

    def lapsed(self, now: datetime) -> bool:
        return self.lease_expires_at is not None and self.lease_expires_at <= now


@dataclass(frozen=True)
class ThreadState:
    """What a run begins on: the run holding the thread, if any, and the model's view of the thread."""

    running: Running | None
    history: list[ModelMessage]


def thread_state(*, thread_id: uuid.UUID, turns: int) -> ThreadState:
    """The answer open on the thread (being written, or waiting for an approval), and the last `turns` finished
    exchanges (tool calls included), in one query. An open answer is the thread's latest: no run begins while one
    holds the thread."""
    rows = list(
        Message.objects.filter(thread_id=thread_id)
        .filter(
            Q(status__in=Message.OPEN)
            | Q(role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE, model_messages__isnull=False)
        )
        .order_by("-seq")
        .values_list("pk", "status", "lease_expires_at", "metadata", "model_messages")[: turns + 1]
    )
    running = None
    if rows and rows[0][1] in Message.OPEN:
        message_id, status, lease_expires_at, metadata, _ = rows.pop(0)
        running = Running(message_id, lease_expires_at, metadata, status)
    stored = [row[4] for row in rows[:turns]]
    history = ModelMessagesTypeAdapter.validate_python(list(chain.from_iterable(reversed(stored))))
    return ThreadState(running, history)


def run_answer_state(*, message_id: uuid.UUID) -> tuple[str, JSONObject] | None:
    """The status and metadata saved for a run's answer, or None once it is gone with its thread."""
    return Message.objects.filter(pk=message_id).values_list("status", "metadata").first()


def run_answer_status(*, thread_id: uuid.UUID, user_id: uuid.UUID, message_id: uuid.UUID) -> str:
    """The status of the answer `message_id` of the user's thread; NotFound for anything else (another thread's,
    another user's, a question)."""
    status = (
        Message.objects.filter(pk=message_id, thread_id=thread_id, thread__user_id=user_id, role=Message.Role.ASSISTANT)
        .values_list("status", flat=True)
        .first()
    )
    if status is None:
        raise NotFound("There is no such answer on this thread.")
    return status


def approval_wait(*, message_id: uuid.UUID, now: datetime) -> bool:
    """Whether an approval the answer waits for may still be decided (False: every pending one expired)."""
    return Approval.objects.filter(message_id=message_id, status=Approval.Status.PENDING, expires_at__gt=now).exists()


def answers_with_lapsed_approvals(*, now: datetime) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Answers (thread id, message id) waiting for approvals that all expired: to go on, the model told so."""
    lapsed = Approval.objects.filter(status=Approval.Status.PENDING, expires_at__lte=now)
    waiting = Approval.objects.filter(status=Approval.Status.PENDING, expires_at__gt=now)
    return list(
        lapsed.exclude(message_id__in=waiting.values("message_id"))
        .values_list("message__thread_id", "message_id")
        .distinct()
    )
