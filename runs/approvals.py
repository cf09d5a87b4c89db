"""The customer's decisions on the tool calls an answer stopped for, and the answer going on after them.

A decision is a conditional write: of two decisions at once on one approval, exactly one finds it pending. Once no
approval of the answer is pending, the answer takes its thread's lease again (`awaiting_approval` becomes
`in_progress`, the same rule as for a new question) and its run goes on in whichever process took the decision.
"""

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone
from pydantic_ai.messages import ModelMessagesTypeAdapter
from pydantic_ai.tools import DeferredToolResults, ToolDenied

from audit.trail import record
from bankagent.context import Actor
from bankagent.exceptions import ApprovalDecided, ApprovalExpired, NotFound
from runs.selectors import thread_state
from runs.services import RunStart
from threads.models import Approval, Message, Thread

DENIED = "The customer declined: this was not done."
EXPIRED = "The customer did not answer in time: this was not done."
EXPIRY = Actor(kind="system", name="approval expiry")


@transaction.atomic
def approval_decide(
    *,
    thread_id: uuid.UUID,
    user_id: uuid.UUID,
    approval_id: uuid.UUID,
    approved: bool,
    note: str,
    lease_seconds: float,
    history_turns: int,
    deps_for: Callable[[str, uuid.UUID], object],
) -> RunStart | None:
    """Record the customer's decision on one approval of their thread. Returns what the answer goes on with once
    no approval of it is pending, None while others are. One that had expired is recorded as expired (and the
    answer goes on all the same: `decided` says so). Raises NotFound, ApprovalDecided or ApprovalExpired."""
    now = timezone.now()
    thread = _locked(thread_id, user_id)
    approval = Approval.objects.filter(pk=approval_id, message__thread=thread).first()
    if approval is None:
        raise NotFound("There is no such approval on this thread.")
    if approval.status == Approval.Status.EXPIRED:
        raise ApprovalExpired()
    expired = approval.expires_at <= now
    status = Approval.Status.APPROVED if approved else Approval.Status.DENIED
    if expired:
        status = Approval.Status.EXPIRED
    decided = Approval.objects.filter(pk=approval.pk, status=Approval.Status.PENDING).update(
        status=status, decided_at=now, note="" if expired else note
    )
    if not decided:
        raise ApprovalDecided()
    approval.status, approval.decided_at = status, now
    record(approval, f"approval.{status}", {"status": (Approval.Status.PENDING, status), "decided_at": (None, now)})
    return _go_on(thread, approval.message_id, now, status, lease_seconds, history_turns, deps_for)


@transaction.atomic
def approvals_lapse(
    *,
    message_id: uuid.UUID,
    lease_seconds: float,
    history_turns: int,
    deps_for: Callable[[str, uuid.UUID], object],
) -> RunStart | None:
    """Record the answer's approvals that expired undecided as expired, and let it go on (the model is told).
    None when nothing was left to do: they were decided, or the answer went on, meanwhile."""
    now = timezone.now()
    thread_id = Message.objects.filter(pk=message_id).values_list("thread_id", flat=True).first()
    if thread_id is None:
        return None
    thread = _locked(thread_id, None)
    # Read, then written, under the thread's lock, which every decision takes first: none is decided in between.
    lapsed = list(Approval.objects.filter(message_id=message_id, status=Approval.Status.PENDING, expires_at__lte=now))
    Approval.objects.filter(pk__in=[approval.pk for approval in lapsed], status=Approval.Status.PENDING).update(
        status=Approval.Status.EXPIRED, decided_at=now
    )
    for approval in lapsed:
        approval.status, approval.decided_at = Approval.Status.EXPIRED, now
        changes = {"status": (Approval.Status.PENDING, Approval.Status.EXPIRED), "decided_at": (None, now)}
        record(approval, "approval.expired", changes, actor=EXPIRY)
    return _go_on(thread, message_id, now, Approval.Status.EXPIRED, lease_seconds, history_turns, deps_for)


def _locked(thread_id: uuid.UUID, user_id: uuid.UUID | None) -> Thread:
    """The thread, locked as a new question locks it: decisions and questions on it take their turns."""
    threads = Thread.objects.select_for_update()
    if user_id is not None:
        threads = threads.filter(user_id=user_id)
    try:
        return threads.get(pk=thread_id)
    except Thread.DoesNotExist as exc:
        raise NotFound("Thread not found.") from exc


def _go_on(
    thread: Thread,
    message_id: uuid.UUID,
    now: datetime,
    decided: str,
    lease_seconds: float,
    history_turns: int,
    deps_for: Callable[[str, uuid.UUID], object],
) -> RunStart | None:
    """Once none of its approvals is pending, the answer takes the thread's lease again, and goes on with what the
    model said before it stopped and the customer's decisions."""
    approvals = list(Approval.objects.filter(message_id=message_id))
    if any(approval.status == Approval.Status.PENDING for approval in approvals):
        return None
    took = Message.objects.filter(pk=message_id, status=Message.Status.AWAITING_APPROVAL).update(
        status=Message.Status.IN_PROGRESS, lease_expires_at=now + timedelta(seconds=lease_seconds)
    )
    if not took:
        return None
    answer = Message.objects.get(pk=message_id)
    question = Message.objects.get(thread=thread, seq=answer.seq - 1)
    earlier = ModelMessagesTypeAdapter.validate_python(answer.model_messages or [])
    state = thread_state(thread_id=thread.pk, turns=history_turns)
    results = DeferredToolResults(approvals={approval.tool_call_id: _decision(approval) for approval in approvals})
    return RunStart(
        thread,
        question,
        answer,
        [*state.history, *earlier],
        deps_for(thread.agent_type, thread.user_id),
        deferred=results,
        earlier=earlier,
        first_seq=max(approval.events_seq for approval in approvals),
        decided=decided,
        approvals=[{"id": str(a.id), "tool": a.tool_name, "status": a.status} for a in approvals],
    )


def _decision(approval: Approval) -> bool | ToolDenied:
    if approval.status == Approval.Status.APPROVED:
        return True
    if approval.status == Approval.Status.EXPIRED:
        return ToolDenied(EXPIRED)
    return ToolDenied(f"{DENIED} Their note: {approval.note}" if approval.note else DENIED)
