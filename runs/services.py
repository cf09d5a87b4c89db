"""The run's writes. One run at a time per thread, across processes: its lease is the assistant message it is
writing, `in_progress` until `lease_expires_at`. A run renews it while it lives; a run whose lease lapsed
without its finish (its process died) is marked `failed` with `run_interrupted` by whoever comes next.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone
from pydantic_ai.messages import ModelMessage
from pydantic_ai.tools import DeferredToolResults

from bankagent.exceptions import ApprovalLapsed, ApprovalPending, NotFound, ThreadBusy
from bankagent.jsontypes import JSON, JSONObject
from runs.selectors import Running, approval_wait, thread_state
from runs.spending import Spending, usage_count
from threads.models import ONE_RUN_PER_THREAD, Approval, Message, Thread

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
    query: str | None = None
    """The question the model answers; None when an answer goes on after the customer's decision."""
    deferred: DeferredToolResults | None = None
    """The customer's decisions on the tool calls the answer waited for."""
    earlier: list[ModelMessage] = field(default_factory=list)
    """What the answer said before it stopped for approval: its saved messages begin with these."""
    first_seq: int = 0
    """The seq of the answer's last event so far: its events go on from there."""
    decided: str | None = None
    """The status the decision that let the answer go on gave its approval (`approved`, `denied`, `expired`)."""
    approvals: list[JSONObject] = field(default_factory=list)
    """The answer's decided approvals, `{id, tool, status}`, when it goes on after them."""


@dataclass(frozen=True)
class PendingCall:
    """A tool call an answer stopped for: it waits for the customer's approval."""

    id: uuid.UUID
    tool_name: str
    tool_call_id: str
    args: JSONObject
    expires_at: datetime


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
    the run. One run per thread is the database's rule (a unique index on the thread's answer in progress); the
    thread's row lock only orders the callers, and each statement after it sees what they committed: the history,
    read with whichever run holds the thread, holds every run that finished before this one.
    Raises NotFound (another user's thread too) or ThreadBusy, writing nothing.
    """
    _commit_without_waiting_for_disk()
    now = timezone.now()
    try:
        thread = Thread.objects.select_for_update().get(pk=thread_id, user_id=user_id)
    except Thread.DoesNotExist as exc:
        raise NotFound("Thread not found.") from exc
    state = thread_state(thread_id=thread.pk, turns=history_turns)
    if state.running is not None and state.running.status == Message.Status.AWAITING_APPROVAL:
        if approval_wait(message_id=state.running.message_id, now=now):
            raise ApprovalPending()
        raise ApprovalLapsed(state.running.message_id)
    # A run whose lease lapsed is taken over only if it really is interrupted: one that renewed meanwhile keeps it.
    if state.running is not None and not (state.running.lapsed(now) and _interrupt(state.running, now)):
        raise ThreadBusy()
    try:
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
    except IntegrityError as exc:
        if _refused_a_second_run(exc):
            raise ThreadBusy() from exc
        raise
    Thread.objects.filter(pk=thread.pk).update(last_seq=F("last_seq") + 2, updated_at=now)
    thread.last_seq, thread.updated_at = thread.last_seq + 2, now
    deps = deps_for(thread.agent_type, user_id)
    return RunStart(thread, user_message, assistant_message, state.history, deps, query=query)


def _refused_a_second_run(error: IntegrityError) -> bool:
    """Whether the database refused the answer because another run holds the thread (not some other rule)."""
    diagnostics = getattr(error.__cause__, "diag", None)
    if diagnostics is not None:  # PostgreSQL names the constraint
        return diagnostics.constraint_name == ONE_RUN_PER_THREAD
    return str(error).endswith(f"{Message._meta.db_table}.thread_id")  # SQLite names its columns


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
    # Only the answers' rows, in one order: the default ordering would join (and lock) their threads too, and
    # a run beginning on one of them locks its thread first and then its answer.
    held = set(
        Message.objects.select_for_update()
        .filter(pk__in=message_ids, status=Message.Status.IN_PROGRESS)
        .order_by("pk")
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
    tool_calls: list[JSON] | None = None,
    approvals: list[PendingCall] | None = None,
    events_seq: int = 0,
    spending: Spending | None = None,
) -> bool:
    """Fill the assistant message of a finished run (complete, cancelled or failed), or of one stopped to wait for
    the customer's approval of `approvals` (and save those, with the seq of the answer's last event); this releases
    the thread, or leaves it to the answer waiting. What the run used (`spending`) is counted to its user's day with
    it, once.

    False when the run no longer held its message: it was interrupted meanwhile, or its thread deleted.
    """
    update = Message.objects.filter(pk=message_id, status=Message.Status.IN_PROGRESS).update
    fields = {
        "status": status,
        "content": content,
        "output": output,
        "metadata": metadata,
        "model_messages": model_messages,
        "tool_calls": tool_calls or [],
        "lease_expires_at": None,
    }
    if not approvals and spending is None:
        return bool(update(**fields))
    with transaction.atomic():
        if not update(**fields):
            return False
        if spending is not None:
            usage_count(spending, now=timezone.now())
        Approval.objects.bulk_create(
            Approval(
                id=call.id,
                message_id=message_id,
                tool_name=call.tool_name,
                tool_call_id=call.tool_call_id,
                args=call.args,
                expires_at=call.expires_at,
                events_seq=events_seq,
            )
            for call in approvals or []
        )
    return True


def runs_interrupt(*, thread_id: uuid.UUID | None = None) -> int:
    """Mark every run whose lease lapsed without its finish as failed (`run_interrupted`), keeping what it saved.

    Runs when a thread is next read or queried, and periodically for every thread.
    """
    now = timezone.now()
    lapsed = Message.objects.filter(status=Message.Status.IN_PROGRESS, lease_expires_at__lte=now)
    if thread_id is not None:
        lapsed = lapsed.filter(thread_id=thread_id)
    rows = lapsed.order_by().values_list("pk", "lease_expires_at", "metadata")
    return sum(_interrupt(Running(*row), now) for row in rows)


def _interrupt(running: Running, now: datetime) -> bool:
    """Mark the run interrupted if its lease has lapsed still; False when it renewed it meanwhile, or finished."""
    return bool(
        Message.objects.filter(
            pk=running.message_id, status=Message.Status.IN_PROGRESS, lease_expires_at__lte=now
        ).update(
            status=Message.Status.FAILED, lease_expires_at=None, metadata={**running.metadata, "error": INTERRUPTED}
        )
    )
