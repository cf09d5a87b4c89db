from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from bankagent.exceptions import InvalidText, QueryTooLong, UnknownAgentType
from threads.models import Message, Thread


def check_text(value: str) -> str:
    """NUL and lone surrogates corrupt storage and logs downstream: refuse them at the door."""
    if "\x00" in value or any("\ud800" <= char <= "\udfff" for char in value):
        raise InvalidText()
    return value


def check_json_text(value: Any) -> Any:
    """check_text on every string of a JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


class TextField(serializers.CharField):
    """A string and only a string (DRF would turn 12 into "12"), free of NUL and lone surrogates."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(check_text(data))


class AgentTypeField(TextField):
    """An agent type of the registry, which the view passes as the context's `agent_types` (threads does not import
    agents here). Exactly as listed: " bank_support" names no agent."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        known = self.context["agent_types"]
        if value not in known:
            raise UnknownAgentType.of(value, known)
        return value


class IdField(serializers.UUIDField):
    """A UUID given as a string (DRF would also take the integer 12 as a UUID)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


@extend_schema_field({"type": ["object", "null"], "description": "The structured output; null for text agents."})
class OutputField(serializers.JSONField):
    pass


@extend_schema_field({"type": "object"})
class ObjectField(serializers.JSONField):
    pass


class MetadataField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise serializers.ValidationError("metadata must be a JSON object.")
        return check_json_text(super().to_internal_value(data))


class ThreadSerializer(serializers.ModelSerializer):
    metadata = ObjectField(read_only=True)

    class Meta:
        model = Thread
        fields = ["id", "user_id", "agent_type", "title", "metadata", "created_at", "updated_at"]
        read_only_fields = fields


class ThreadCreateSerializer(serializers.Serializer):
    agent_type = AgentTypeField(max_length=50)
    title = TextField(max_length=200, required=False, allow_null=True, allow_blank=True)
    metadata = MetadataField(required=False)


class ThreadUpdateSerializer(serializers.Serializer):
    title = TextField(max_length=200, required=False, allow_null=True, allow_blank=True)
    metadata = MetadataField(required=False)


class ApprovalSerializer(serializers.Serializer):
    """A tool call the answer waits for the customer to approve before it runs."""

    id = serializers.UUIDField()
    tool = serializers.CharField(source="tool_name")
    args = ObjectField()
    expires_at = serializers.DateTimeField(help_text="Past it, a decision answers 410 `approval_expired`.")


class ToolCallSerializer(serializers.Serializer):
    name = serializers.CharField()
    args = ObjectField()
    result = serializers.JSONField(
        help_text="What the tool returned, whole (what the model was told, when it did not run)."
    )
    outcome = serializers.ChoiceField(
        choices=["success", "failed", "denied", "pending"],
        help_text="`denied`: the customer did not approve it; `pending`: it waits for their approval.",
    )
    duration_ms = serializers.IntegerField(
        allow_null=True, help_text="How long it ran (its wait for approval not counted)."
    )


class MessageSerializer(serializers.ModelSerializer):
    thread_id = serializers.UUIDField(read_only=True)
    output = OutputField(read_only=True)
    metadata = ObjectField(
        read_only=True, help_text="On assistant messages the server adds `model`, `usage` and `duration_ms`."
    )
    tool_calls = ToolCallSerializer(many=True, read_only=True, help_text="The tools the answer used, in order.")
    approval = ApprovalSerializer(
        source="pending_approval",
        read_only=True,
        allow_null=True,
        default=None,
        help_text="While the answer is `awaiting_approval`: what it waits for. Otherwise null.",
    )

    class Meta:
        model = Message
        fields = [
            "id",
            "thread_id",
            "role",
            "content",
            "output",
            "status",
            "metadata",
            "tool_calls",
            "approval",
            "created_at",
        ]
        read_only_fields = fields


class ActiveRunSerializer(serializers.Serializer):
    """The run answering on the thread now: resume it from `last_seq`, the seq of its latest event."""

    message_id = serializers.UUIDField()
    last_seq = serializers.IntegerField(min_value=0)


class ThreadSummarySerializer(serializers.Serializer):
    """The earlier exchanges the model is shown as a summary, having left its window of the latest ones: null while
    it sees them all."""

    exchanges = serializers.IntegerField(source="summary_exchanges", min_value=1, help_text="How many it covers.")
    updated_at = serializers.DateTimeField(source="summary_updated_at")

    def to_representation(self, instance: Thread) -> dict[str, Any] | None:
        return super().to_representation(instance) if instance.summary_exchanges else None


class ThreadDetailSerializer(ThreadSerializer):
    messages = MessageSerializer(source="messages_page", many=True, read_only=True)
    has_more_messages = serializers.BooleanField(read_only=True)
    active_run = ActiveRunSerializer(read_only=True, allow_null=True)
    summary = ThreadSummarySerializer(source="*", read_only=True, allow_null=True)

    class Meta(ThreadSerializer.Meta):
        fields = [*ThreadSerializer.Meta.fields, "messages", "has_more_messages", "active_run", "summary"]
        read_only_fields = fields


class QueryField(TextField):
    """1 to 8,000 code points after stripping."""

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        if len(value) > settings.MAX_QUERY_CHARS:
            raise QueryTooLong(details={"max_length": settings.MAX_QUERY_CHARS, "length": len(value)})
        return value


class AgentQuerySerializer(serializers.Serializer):
    thread_id = IdField()
    query = QueryField()


class QueryFrameSerializer(serializers.Serializer):
    """A websocket `query` frame: the thread is the socket's."""

    query = QueryField()
    request_id = TextField(max_length=100, required=False)


class TicketRequestSerializer(serializers.Serializer):
    thread_id = IdField()


class TicketSerializer(serializers.Serializer):
    ticket = serializers.CharField()
    expires_at = serializers.DateTimeField()


class AgentResponseSerializer(serializers.Serializer):
    thread_id = serializers.UUIDField(source="assistant_message.thread_id")
    message_id = serializers.UUIDField(source="assistant_message.id")
    user_message_id = serializers.UUIDField(source="user_message.id")
    response = serializers.CharField(source="assistant_message.content")
    output = OutputField(source="assistant_message.output")
    status = serializers.ChoiceField(
        choices=["complete", "incomplete", "awaiting_approval"],
        source="assistant_message.status",
        help_text="`complete`, `incomplete` when the run was cancelled, or `awaiting_approval` when it stopped to "
        "wait for the customer's approval (`approval`).",
    )
    approval = ApprovalSerializer(
        source="assistant_message.pending_approval", allow_null=True, default=None, help_text="As the message's."
    )


class AgentSerializer(serializers.Serializer):
    agent_type = serializers.CharField()
    description = serializers.CharField()
    output_schema = ObjectField(help_text="The JSON Schema of the agent's output.")


class ApprovalDecisionSerializer(serializers.Serializer):
    approved = serializers.BooleanField(help_text="true: let the tool call run; false: it does not.")
    note = TextField(max_length=1000, required=False, allow_blank=True, default="")

    def to_internal_value(self, data: Any) -> Any:
        # A decision is a JSON boolean: DRF would read "yes" or 1 as true.
        if isinstance(data, dict) and "approved" in data and not isinstance(data["approved"], bool):
            raise serializers.ValidationError({"approved": ["Must be true or false."]})
        return super().to_internal_value(data)


class ApprovalFrameSerializer(ApprovalDecisionSerializer):
    """A websocket `approval` frame: the thread is the socket's."""

    approval_id = IdField()
    request_id = TextField(max_length=100, required=False)
