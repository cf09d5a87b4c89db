import json

from auditlog.models import LogEntry
from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.html import format_html

from audit.admin import AuditTrailMixin
from audit.selectors import records_for_thread
from bankagent.jsontypes import JSON
from threads.models import Approval, Message, Thread
from threads.selectors import (
    HIGH_RISK,
    INTERRUPTED_CODE,
    status_text,
    thread_transcript,
    threads_export,
    threads_for_review,
    threads_with_answers,
)


def pretty_json(value: object) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


@admin.display(description="status")
def outcome(message: Message) -> str:
    error = message.metadata.get("error") if isinstance(message.metadata, dict) else None
    return status_text(message.status, error.get("code") if isinstance(error, dict) else None)


def json_download(data: JSON, filename: str) -> JsonResponse:
    response = JsonResponse(data, safe=False, json_dumps_params={"indent": 2, "ensure_ascii": False})
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


ANSWER_STATUSES = {
    Message.Status.FAILED: "failed (any)",
    INTERRUPTED_CODE: "interrupted",
    Message.Status.INCOMPLETE: "incomplete",
    Message.Status.AWAITING_APPROVAL: "awaiting approval",
}


class AnswerStatusFilter(admin.SimpleListFilter):
    """Conversations with an answer that did not simply complete."""

    title = "answer status"
    parameter_name = "answer_status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return list(ANSWER_STATUSES.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet[Thread]) -> QuerySet[Thread]:
        value = self.value()
        if value == INTERRUPTED_CODE:
            return threads_with_answers(queryset, status=Message.Status.FAILED, metadata__error__code=INTERRUPTED_CODE)
        if value in ANSWER_STATUSES:
            return threads_with_answers(queryset, status=value)
        return queryset


class HighRiskFilter(admin.SimpleListFilter):
    title = "risk level"
    parameter_name = "risk"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("high", f"{HIGH_RISK} and above")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Thread]) -> QuerySet[Thread]:
        return queryset.filter(max_risk__gte=HIGH_RISK) if self.value() == "high" else queryset


class CardBlockedFilter(admin.SimpleListFilter):
    title = "card blocked"
    parameter_name = "card_blocked"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Thread]) -> QuerySet[Thread]:
        if self.value() in {"yes", "no"}:
            return queryset.filter(card_blocked=self.value() == "yes")
        return queryset


@admin.register(Thread)
class ThreadAdmin(AuditTrailMixin, admin.ModelAdmin):
    """The review desk: conversations listed with what flags them, each read as a transcript."""

    list_display = [
        *("__str__", "agent_type", "user_id", "messages", "last_activity", "latest_answer", "risk"),
        *("card_blocked", "tokens", "created_at"),
    ]
    list_filter = ["agent_type", AnswerStatusFilter, HighRiskFilter, CardBlockedFilter, "created_at", "updated_at"]
    search_fields = ["user_id", "title", "messages__content"]
    date_hierarchy = "created_at"
    readonly_fields = ["id", "user_id", "agent_type", "last_seq", "created_at", "updated_at", "summary"]
    fields = ["id", "user_id", "agent_type", "title", "metadata", "last_seq", "created_at", "updated_at", "summary"]
    actions = ["export_json"]
    save_on_top = True  # the transcript below the fields can be long

    def get_queryset(self, request: HttpRequest) -> QuerySet[Thread]:
        return threads_for_review(super().get_queryset(request))

    def audit_records(self, thread: Thread) -> QuerySet[LogEntry]:
        return records_for_thread(thread)

    @admin.display(description="messages", ordering="message_count")
    def messages(self, thread: Thread) -> int:
        return thread.message_count

    @admin.display(description="last activity", ordering="last_activity")
    def last_activity(self, thread: Thread) -> object:
        return thread.last_activity

    @admin.display(description="latest answer", ordering="latest_status")
    def latest_answer(self, thread: Thread) -> str:
        return status_text(thread.latest_status, thread.latest_error)

    @admin.display(description="highest risk", ordering="max_risk")
    def risk(self, thread: Thread) -> str:
        if thread.max_risk is None:
            return "-"
        if thread.max_risk >= HIGH_RISK:
            return format_html("<strong style='color: #ba2121'>{}</strong>", thread.max_risk)
        return str(thread.max_risk)

    @admin.display(description="card blocked", boolean=True, ordering="card_blocked")
    def card_blocked(self, thread: Thread) -> bool:
        return thread.card_blocked

    @admin.display(description="tokens", ordering="total_tokens")
    def tokens(self, thread: Thread) -> int:
        return thread.total_tokens

    def get_urls(self) -> list[URLPattern]:
        export = path(
            "<path:object_id>/export/",
            self.admin_site.admin_view(self.export_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_export",
        )
        return [export, *super().get_urls()]

    def export_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The thread and all its messages as a JSON file, for anyone who may view it."""
        thread = self.get_object(request, unquote(object_id))
        if thread is None:
            raise Http404("No thread has this id.")
        if not self.has_view_permission(request, thread):
            raise PermissionDenied
        return json_download(threads_export(Thread.objects.filter(pk=thread.pk))[0], f"thread-{thread.pk}.json")

    @admin.action(description="Export selected threads as JSON", permissions=["view"])
    def export_json(self, request: HttpRequest, queryset: QuerySet[Thread]) -> HttpResponse:
        return json_download(threads_export(queryset), "threads.json")

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, object],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Thread | None = None,
    ) -> TemplateResponse:
        if obj is not None:
            context["transcript"] = thread_transcript(thread=obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request: HttpRequest, obj: Thread, form: object, change: bool) -> None:
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

    def has_add_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """Messages are what the conversation said: anyone may read them, no one edits them here."""

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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
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
