"""Reads: every query on threads and messages, always scoped by the end user."""

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import (
    Aggregate,
    BigIntegerField,
    BooleanField,
    Count,
    Exists,
    Expression,
    F,
    IntegerField,
    Max,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce
from django.db.models.sql.compiler import SQLCompiler

from bankagent.exceptions import NotFound
from bankagent.jsontypes import JSON, JSONObject
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


# The review desk (the admin): what staff read of the conversations, whoever's they are.

BLOCK_CARD = "block_card"
INTERRUPTED_CODE = "run_interrupted"
HIGH_RISK = 7
"""A risk level from which an answer's conversation is worth a reviewer's look first."""


class ToolCallEnded(Expression):
    """Whether a message's `tool_calls` hold a call of the tool `name` that ended `outcome`, on PostgreSQL and on
    SQLite alike (Django's JSON `contains` has no SQLite form)."""

    output_field = BooleanField()
    conditional = True

    def __init__(self, name: str, outcome: str) -> None:
        super().__init__()
        self.name, self.outcome = name, outcome
        self.calls: Expression | F = F("tool_calls")

    def get_source_expressions(self) -> list[Expression | F]:
        return [self.calls]

    def set_source_expressions(self, expressions: list[Expression | F]) -> None:
        (self.calls,) = expressions

    def as_sql(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper) -> tuple[str, tuple[object, ...]]:
        column, params = compiler.compile(self.calls)
        sql = (
            f"EXISTS (SELECT 1 FROM json_each({column}) AS made WHERE json_extract(made.value, '$.name') = %s "
            "AND json_extract(made.value, '$.outcome') = %s)"
        )
        return sql, (*params, self.name, self.outcome)

    def as_postgresql(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper) -> tuple[str, tuple[object, ...]]:
        column, params = compiler.compile(self.calls)
        return f"{column} @> %s::jsonb", (*params, json.dumps([{"name": self.name, "outcome": self.outcome}]))


def _of_each_thread(aggregate: Aggregate, **filters: object) -> Subquery:
    """An aggregate over each thread's messages, as a subquery: one statement for a whole page of threads."""
    messages = Message.objects.filter(thread=OuterRef("pk"), **filters).order_by().values("thread")
    return Subquery(messages.annotate(value=aggregate).values("value"))


def _latest_answer(value: str | Expression) -> Subquery:
    answers = Message.objects.filter(thread=OuterRef("pk"), role=Message.Role.ASSISTANT).order_by("-seq")
    return Subquery(answers.values(value=value if isinstance(value, Expression) else F(value))[:1])


def card_blocked_by() -> Q:
    """An answer that blocked a card: its output says so, or its block_card call ran."""
    return Q(output__block_card=True) | Q(ToolCallEnded(BLOCK_CARD, "success"))


def threads_for_review(threads: QuerySet[Thread]) -> QuerySet[Thread]:
    """The threads, each with what a reviewer scans a list for (`message_count`, `last_activity`,
    `latest_status` and `latest_error` of the latest answer, `max_risk`, `card_blocked`, `total_tokens`), in the
    one statement that reads them, however many they are."""
    answers = {"role": Message.Role.ASSISTANT}
    blocking = Message.objects.filter(card_blocked_by(), thread=OuterRef("pk"), **answers)
    return threads.annotate(
        message_count=Coalesce(_of_each_thread(Count("pk")), 0),
        last_activity=Coalesce(_of_each_thread(Max("created_at")), F("created_at")),
        latest_status=_latest_answer("status"),
        latest_error=_latest_answer(KT("metadata__error__code")),
        max_risk=_of_each_thread(Max(Cast(KT("output__risk_level"), IntegerField())), **answers),
        card_blocked=Exists(blocking),
        total_tokens=Coalesce(
            _of_each_thread(Sum(Cast(KT("metadata__usage__total_tokens"), BigIntegerField())), **answers), 0
        ),
    )


def threads_with_answers(threads: QuerySet[Thread], **answer: object) -> QuerySet[Thread]:
    """The threads with at least one message as `answer` says (field lookups on Message)."""
    return threads.filter(Exists(Message.objects.filter(thread=OuterRef("pk"), **answer)))


def status_text(status: str | None, error_code: JSON) -> str:
    """A status as a reviewer reads it: a failed answer says why, one whose server stopped while writing it so."""
    if status is None:
        return "-"
    if status == Message.Status.FAILED and error_code == INTERRUPTED_CODE:
        return "interrupted (the server stopped while writing it)"
    if status == Message.Status.FAILED and isinstance(error_code, str):
        return f"failed: {error_code}"
    return Message.Status(status).label if status in Message.Status.values else status


@dataclass(frozen=True)
class ToolCall:
    name: str
    args_text: str
    outcome: str
    duration_ms: int | None


@dataclass(frozen=True)
class TranscriptEntry:
    """One message of a conversation as a reviewer reads it."""

    message: Message
    approvals: list[Approval]

    @property
    def structured(self) -> JSONObject | None:
        output = self.message.output
        return output if self.message.role == Message.Role.ASSISTANT and isinstance(output, dict) else None

    @property
    def advice(self) -> str | None:
        advice = (self.structured or {}).get("support_advice")
        return advice if isinstance(advice, str) else None

    @property
    def risk_level(self) -> int | None:
        risk = (self.structured or {}).get("risk_level")
        return risk if isinstance(risk, int) and not isinstance(risk, bool) else None

    @property
    def risk_band(self) -> str:
        """low (0 to 3), medium (4 to 6) or high (7 and above): the colour of the risk pill."""
        if self.risk_level is None or self.risk_level < 4:
            return "low"
        return "medium" if self.risk_level < HIGH_RISK else "high"

    @property
    def block_card(self) -> bool:
        return (self.structured or {}).get("block_card") is True

    @property
    def follow_up_actions(self) -> list[str]:
        actions = (self.structured or {}).get("follow_up_actions")
        return [action for action in actions if isinstance(action, str)] if isinstance(actions, list) else []

    @property
    def status_text(self) -> str:
        error = self._metadata.get("error")
        return status_text(self.message.status, error.get("code") if isinstance(error, dict) else None)

    @property
    def tool_calls(self) -> list[ToolCall]:
        calls = self.message.tool_calls if isinstance(self.message.tool_calls, list) else []
        return [
            ToolCall(
                name=str(call.get("name")),
                args_text=json.dumps(call.get("args"), ensure_ascii=False),
                outcome=str(call.get("outcome")),
                duration_ms=_count(call.get("duration_ms")),
            )
            for call in calls
            if isinstance(call, dict)
        ]

    @property
    def pending_approvals(self) -> list[Approval]:
        return [approval for approval in self.approvals if approval.status == Approval.Status.PENDING]

    @property
    def model(self) -> str | None:
        model = self._metadata.get("model")
        return model if isinstance(model, str) else None

    @property
    def duration_ms(self) -> int | None:
        return _count(self._metadata.get("duration_ms"))

    @property
    def tokens(self) -> int | None:
        return _count(self._usage.get("total_tokens"))

    @property
    def cost(self) -> Decimal | None:
        """The answer's estimated price in USD; None when unknown (a model genai-prices has no price for)."""
        cost = self._metadata.get("cost")
        if not isinstance(cost, str):
            return None
        try:
            return Decimal(cost)
        except InvalidOperation:
            return None

    @property
    def priced(self) -> bool:
        """An answer that used the model, and so has a price, known or not."""
        return bool(self._usage)

    @property
    def _metadata(self) -> JSONObject:
        metadata = self.message.metadata
        return metadata if isinstance(metadata, dict) else {}

    @property
    def _usage(self) -> JSONObject:
        usage = self._metadata.get("usage")
        return usage if isinstance(usage, dict) else {}


def _count(value: JSON) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Transcript:
    entries: list[TranscriptEntry]

    @property
    def messages(self) -> int:
        return len(self.entries)

    @property
    def tokens(self) -> int:
        return sum(entry.tokens or 0 for entry in self.entries)

    @property
    def duration_ms(self) -> int:
        return sum(entry.duration_ms or 0 for entry in self.entries)

    @property
    def cost(self) -> Decimal | None:
        """The known prices added up; None when no answer's price is known."""
        known = [entry.cost for entry in self.entries if entry.cost is not None]
        return sum(known, Decimal(0)) if known else None

    @property
    def unpriced(self) -> int:
        """Answers that used the model at a price unknown: the total cost leaves them out."""
        return sum(1 for entry in self.entries if entry.priced and entry.cost is None)


def thread_transcript(*, thread: Thread) -> Transcript:
    """The whole conversation, oldest first, each answer with its approvals: two queries."""
    return _transcript_of(message_list(thread=thread).order_by("seq").prefetch_related("approvals"))


def _transcript_of(messages: Iterable[Message]) -> Transcript:
    return Transcript([TranscriptEntry(message, list(message.approvals.all())) for message in messages])


def threads_export(threads: QuerySet[Thread]) -> list[JSONObject]:
    """The threads and every message of each (approvals included), as JSON for a reviewer to keep: three queries
    however many they are."""
    messages = Prefetch("messages", queryset=Message.objects.defer("model_messages").order_by("seq"))
    return [
        {
            "id": str(thread.pk),
            "user_id": str(thread.user_id),
            "agent_type": thread.agent_type,
            "title": thread.title,
            "metadata": thread.metadata,
            "created_at": thread.created_at.isoformat(),
            "updated_at": thread.updated_at.isoformat(),
            "messages": [_message_export(entry) for entry in _transcript_of(thread.messages.all()).entries],
        }
        for thread in threads.prefetch_related(messages, "messages__approvals")
    ]


def _message_export(entry: TranscriptEntry) -> JSONObject:
    message = entry.message
    return {
        "id": str(message.pk),
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "output": message.output,
        "status": message.status,
        "metadata": message.metadata,
        "tool_calls": message.tool_calls,
        "approvals": [
            {
                "id": str(approval.pk),
                "tool": approval.tool_name,
                "tool_call_id": approval.tool_call_id,
                "args": approval.args,
                "status": approval.status,
                "note": approval.note,
                "expires_at": approval.expires_at.isoformat(),
                "decided_at": approval.decided_at.isoformat() if approval.decided_at else None,
            }
            for approval in entry.approvals
        ],
        "created_at": message.created_at.isoformat(),
    }
