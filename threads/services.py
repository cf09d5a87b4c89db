"""Writes: every change to threads and messages goes through these functions."""

import uuid
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from bankagent.exceptions import ThreadBusy
from threads.models import Message, Thread

_UNSET: Any = object()


def thread_create(
    *, user_id: uuid.UUID, agent_type: str, title: str | None = None, metadata: dict[str, Any] | None = None
) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type=agent_type, title=title, metadata=metadata or {})


def thread_update(*, thread: Thread, title: str | None = _UNSET, metadata: dict[str, Any] = _UNSET) -> Thread:
    """Change the client-editable fields given; `title=None` clears the title."""
    fields = []
    if title is not _UNSET:
        thread.title = title
        fields.append("title")
    if metadata is not _UNSET:
        thread.metadata = metadata
        fields.append("metadata")
    if fields:
        thread.save(update_fields=[*fields, "updated_at"])
    return thread


def thread_delete(*, thread: Thread) -> None:
    thread.delete()


@transaction.atomic
def turn_start(*, thread: Thread, query: str, run_token: uuid.UUID, lease_seconds: float) -> tuple[Message, Message]:
    """Take the thread's run lease, save the user's query and an `incomplete` assistant message to fill.

    Both are committed before the model runs, so nothing the user said is lost whatever happens to the run.
    Raises ThreadBusy, writing nothing, while another run holds a live lease.
    """
    locked = Thread.objects.select_for_update().only("last_seq", "run_token", "run_heartbeat").get(pk=thread.pk)
    now = timezone.now()
    if locked.run_token and locked.run_heartbeat and locked.run_heartbeat > now - timedelta(seconds=lease_seconds):
        raise ThreadBusy()
    user_message, assistant_message = Message.objects.bulk_create(
        [
            Message(thread=thread, seq=locked.last_seq + 1, role=Message.Role.USER, content=query),
            Message(
                thread=thread,
                seq=locked.last_seq + 2,
                role=Message.Role.ASSISTANT,
                status=Message.Status.INCOMPLETE,
            ),
        ]
    )
    Thread.objects.filter(pk=thread.pk).update(
        last_seq=F("last_seq") + 2, updated_at=now, run_token=run_token, run_heartbeat=now
    )
    thread.last_seq, thread.updated_at = locked.last_seq + 2, now
    return user_message, assistant_message


def run_heartbeat(*, thread_id: uuid.UUID, run_token: uuid.UUID) -> bool:
    """Keep the run's lease alive; False if the lease was lost (it lapsed and another run took it)."""
    return bool(Thread.objects.filter(pk=thread_id, run_token=run_token).update(run_heartbeat=timezone.now()))


@transaction.atomic
def turn_finish(
    *,
    message: Message,
    run_token: uuid.UUID,
    status: str,
    content: str,
    output: dict[str, Any] | str | None,
    metadata: dict[str, Any],
    model_messages: list[Any] | None = None,
) -> Message:
    """Fill the assistant message of a finished run (complete, cancelled or failed), release the thread."""
    message.status, message.content, message.output = status, content, output
    message.metadata = {**message.metadata, **metadata}
    message.model_messages = model_messages
    message.save(update_fields=["status", "content", "output", "metadata", "model_messages"])
    ours = When(run_token=run_token, then=Value(None))
    Thread.objects.filter(pk=message.thread_id).update(
        updated_at=timezone.now(),
        run_token=Case(ours, default=F("run_token")),
        run_heartbeat=Case(ours, default=F("run_heartbeat")),
    )
    return message
