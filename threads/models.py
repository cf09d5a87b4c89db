import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

ONE_RUN_PER_THREAD = "message_one_run_per_thread"


class Thread(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user_id = models.UUIDField(help_text="The end user who owns the thread.")
    agent_type = models.CharField(max_length=50)
    # The contract distinguishes "no title" (null) from an empty one.
    title = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    metadata = models.JSONField(default=dict, blank=True)
    # The seq of the last message; turns take the next numbers under a row lock.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The exchanges that left the model's history window, folded into a running summary the model is shown ahead of
    # the rest (see runs.summaries): those up to `summary_upto_seq`, `summary_exchanges` of them.
    summary = models.TextField(blank=True, default="", editable=False)
    summary_upto_seq = models.PositiveBigIntegerField(default=0, editable=False)
    summary_exchanges = models.PositiveIntegerField(default=0, editable=False)
    summary_updated_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["user_id", "-updated_at", "-id"], name="thread_user_recent")]

    def __str__(self) -> str:
        return self.title or f"{self.agent_type} {self.id}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        SYSTEM = "system"

    class Status(models.TextChoices):
        IN_PROGRESS = "in_progress", "in progress"
        AWAITING_APPROVAL = "awaiting_approval", "awaiting approval"
        COMPLETE = "complete"
        INCOMPLETE = "incomplete"
        FAILED = "failed"

    OPEN = (Status.IN_PROGRESS, Status.AWAITING_APPROVAL)
    """An answer still to be finished: the thread takes no other question meanwhile."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="messages")
    # Position in the thread: timestamps can tie, seq cannot.
    seq = models.PositiveBigIntegerField(editable=False)
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    output = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.COMPLETE)
    metadata = models.JSONField(default=dict, blank=True)
    tool_calls = models.JSONField(default=list, blank=True, help_text="The tools the answer used, with their results.")
    # pydantic-ai's own message list of the exchange this assistant message ends, tool calls included,
    # so that history replays exactly. Not part of the public shape.
    model_messages = models.JSONField(null=True, blank=True, editable=False)
    # An answer `in_progress` is its run's lease on the thread: one run at a time, across processes. The run
    # renews it while it lives, so one whose process died lapses and is then marked interrupted.
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["thread", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["thread", "seq"], name="message_thread_seq"),
            # One run at a time per thread, whatever any process does: a second answer being written, or one while
            # an answer waits for the customer's approval, is refused.
            models.UniqueConstraint(
                fields=["thread"],
                condition=Q(status__in=["in_progress", "awaiting_approval"]),
                name=ONE_RUN_PER_THREAD,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.seq}"

    @property
    def run_lapsed(self) -> bool:
        """Being written by a run whose lease lapsed: its process died, and it is to be marked interrupted."""
        return (
            self.status == self.Status.IN_PROGRESS
            and self.lease_expires_at is not None
            and self.lease_expires_at <= timezone.now()
        )


class Approval(models.Model):
    """A tool call of an answer that waits for the customer's decision before it runs (blocking their card)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        DENIED = "denied"
        EXPIRED = "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="approvals")
    tool_name = models.CharField(max_length=100)
    tool_call_id = models.CharField(max_length=200)
    args = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    expires_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    note = models.TextField(blank=True, default="")
    events_seq = models.PositiveIntegerField(
        default=0, editable=False, help_text="The seq of the answer's last event before it stopped for approval."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["message", "tool_call_id"], name="approval_one_per_call"),
        ]
        indexes = [
            models.Index(fields=["expires_at"], condition=Q(status="pending"), name="approval_pending_expiry"),
        ]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.status})"
