import json

from django.contrib import admin
from django.utils.html import format_html

from threads.models import Approval, Message, Thread


def pretty_json(value: object) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


@admin.display(description="status")
def outcome(message: Message) -> str:
    """The status, and for a failed answer why: an answer whose server stopped while writing it reads so."""
    error = message.metadata.get("error") if isinstance(message.metadata, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if message.status == Message.Status.FAILED and code == "run_interrupted":
        return "interrupted (the server stopped while writing it)"
    if message.status == Message.Status.FAILED and code:
        return f"failed: {code}"
    return message.get_status_display()


class MessageInline(admin.TabularInline):
    model = Message
    fields = ["seq", "role", outcome, "content", "created_at"]
    readonly_fields = fields
    ordering = ["seq"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Thread)
class ThreadAdmin(admin.ModelAdmin):
    list_display = ["__str__", "agent_type", "user_id", "updated_at", "created_at"]
    list_filter = ["agent_type", "created_at", "updated_at"]
    search_fields = ["user_id", "title"]
    date_hierarchy = "created_at"
    readonly_fields = ["id", "user_id", "agent_type", "last_seq", "created_at", "updated_at", "summary"]
    fields = ["id", "user_id", "agent_type", "title", "metadata", "last_seq", "created_at", "updated_at", "summary"]
    inlines = [MessageInline]

    def save_model(self, request, obj: Thread, form, change: bool) -> None:
        if not change:
            return super().save_model(request, obj, form, change)
        # Only what the form edited: a whole-row save would write back the turn counter a run moved meanwhile.
        if form.changed_data:
            obj.save(update_fields=[*form.changed_data, "updated_at"])


class ApprovalInline(admin.TabularInline):
    """What the answer asked the customer to approve, and what they decided."""

    model = Approval
    fields = ["tool_name", "args", "status", "expires_at", "decided_at", "note"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["__str__", "thread", "role", outcome, "created_at"]
    list_filter = ["role", "status", "created_at"]
    search_fields = ["thread__id", "thread__user_id", "content"]
    list_select_related = ["thread"]
    fields = [
        *("id", "thread", "seq", "role", outcome, "content", "output_json", "tool_calls_json", "metadata_json"),
        "history_json",
    ]
    readonly_fields = fields
    inlines = [ApprovalInline]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="output")
    def output_json(self, message: Message) -> str:
        return pretty_json(message.output)

    @admin.display(description="tool calls")
    def tool_calls_json(self, message: Message) -> str:
        return pretty_json(message.tool_calls)

    @admin.display(description="metadata")
    def metadata_json(self, message: Message) -> str:
        return pretty_json(message.metadata)

    @admin.display(description="model messages (tool calls included)")
    def history_json(self, message: Message) -> str:
        return pretty_json(message.model_messages)
