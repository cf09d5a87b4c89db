"""The run's writes. One run at a time per thread, across processes: its lease is the assistant message it is
writing, `in_progress` until `lease_expires_at`. A run renews it while it lives; a run whose lease lapsed
without its finish (its process died) is marked `failed` with `run_interrupted` by whoever comes next.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone
from pydantic_ai.messages import ModelMessage

from bankagent.exceptions import NotFound, ThreadBusy
from bankagent.jsontypes import JSON, JSONObject
from runs.selectors import thread_history
from threads.models import Message, Thread

INTERRUPTED: JSONObject = {
    "code": "run_interrupted",
    "message": "The server stopped while this answer was being written; ask again.",
}


@dataclass(frozen=True)
class RunStart:
    """What a run holds once its lease is taken: both messages saved, the history the model sees."""

    thread: Thread
    user_message: Message
    assistant_message: Message
    history: list[ModelMessage]
    deps: object


@transaction.atomic
def run_begin(
    *,
    thread_id: uuid.UUID,
    user_id: uuid.UUID,
    query: str,
    model_label: str,
    lease_seconds: float,
    history_turns: int,
    deps_for: Callable[[str, uuid.UUID], object],
) -> RunStart:
    """Take the thread's lease and save the user's query and the assistant message the run will fill.

    Both messages are committed before the model runs, so nothing the user said is lost whatever happens to
    the run. The history is read under the lease, so it holds every run that finished before this one.
    Raises NotFound (another user's thread too) or ThreadBusy, writing nothing.
    """
    _commit_without_waiting_for_disk()
    now = timezone.now()
    in_progress = Message.objects.filter(thread=OuterRef("pk"), status=Message.Status.IN_PROGRESS)
    try:
        thread = (
            Thread.objects.select_for_update()
            .annotate(
                running=Exists(in_progress.filter(lease_expires_at__gt=now)),
                lapsed=Exists(in_progress.filter(lease_expires_at__lte=now)),
            )
            .get(pk=thread_id, user_id=user_id)
        )
    except Thread.DoesNotExist as exc:
        raise NotFound("Thread not found.") from exc
    if thread.running:
        raise ThreadBusy()
    if thread.lapsed:
        runs_interrupt(thread_id=thread.pk)
    history = thread_history(thread_id=thread.pk, turns=history_turns)
    user_message, assistant_message = Message.objects.bulk_create(
        [
            Message(thread=thread, seq=thread.last_seq + 1, role=Message.Role.USER, content=query),
            Message(
                thread=thread,
                seq=thread.last_seq + 2,
                role=Message.Role.ASSISTANT,
                status=Message.Status.IN_PROGRESS,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                metadata={"model": model_label},
            ),
        ]
    )
    Thread.objects.filter(pk=thread.pk).update(last_seq=F("last_seq") + 2, updated_at=now)
    thread.last_seq, thread.updated_at = thread.last_seq + 2, now
    deps = deps_for(thread.agent_type, user_id)
    return RunStart(thread, user_message, assistant_message, history, deps)


def _commit_without_waiting_for_disk() -> None:
    """PostgreSQL: this transaction's commit does not wait for its WAL to reach the disk (2 ms and more a commit).

    It is made durable by the run's finish, whose commit waits for the disk and so flushes everything before it;
    only a database crash while the model answers can lose it, and the run fails with the database anyway.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


@transaction.atomic
def runs_renew(
    *, message_ids: list[uuid.UUID], checkpoints: dict[uuid.UUID, tuple[str, JSON]], lease_seconds: float
) -> set[uuid.UUID]:
    """Extend the leases of these runs, saving the partial answers (content, output) given, in one transaction.

    Returns the runs that no longer hold their message: interrupted meanwhile, or their thread deleted.
    """
    expires = timezone.now() + timedelta(seconds=lease_seconds)
    held = set(
        Message.objects.select_for_update()
        .filter(pk__in=message_ids, status=Message.Status.IN_PROGRESS)
        .values_list("pk", flat=True)
    )
    if renewed_only := held - checkpoints.keys():
        Message.objects.filter(pk__in=renewed_only).update(lease_expires_at=expires)
    saved = [
        Message(pk=pk, content=content, output=output, lease_expires_at=expires)
        for pk, (content, output) in checkpoints.items()
        if pk in held
    ]
    Message.objects.bulk_update(saved, ["content", "output", "lease_expires_at"], batch_size=500)
    return set(message_ids) - held


def run_finish(
    *,
    message_id: uuid.UUID,
    status: str,
    content: str,
    output: JSON,
    metadata: JSONObject,
    model_messages: list[JSON] | None = None,
) -> bool:
    """Fill the assistant message of a finished run (complete, cancelled or failed); this releases the thread.

    False when the run no longer held its message: it was interrupted meanwhile, or its thread deleted.
    """
    updated = Message.objects.filter(pk=message_id, status=Message.Status.IN_PROGRESS).update(
        status=status,
        content=content,
        output=output,
        metadata=metadata,
        model_messages=model_messages,
        lease_expires_at=None,
    )
    return bool(updated)


def run_message_exists(*, message_id: uuid.UUID) -> bool:
    return Message.objects.filter(pk=message_id).exists()


def runs_interrupt(*, thread_id: uuid.UUID | None = None) -> int:
    """Mark every run whose lease lapsed without its finish as failed (`run_interrupted`), keeping what it saved.

    Runs when a thread is next read or queried, and periodically for every thread.
    """
    lapsed = Message.objects.filter(status=Message.Status.IN_PROGRESS, lease_expires_at__lte=timezone.now())
    if thread_id is not None:
        lapsed = lapsed.filter(thread_id=thread_id)
    interrupted = 0
    for message in lapsed.only("pk", "metadata"):
        # The lapse is checked again row by row: a run that renewed its lease meanwhile keeps it.
        interrupted += lapsed.filter(pk=message.pk).update(
            status=Message.Status.FAILED, lease_expires_at=None, metadata={**message.metadata, "error": INTERRUPTED}
        )
    return interrupted
