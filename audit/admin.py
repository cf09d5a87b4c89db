"""The audit trail in the admin: readable, searchable and filterable; nobody adds, edits or deletes a record."""

from auditlog.admin import LogEntryAdmin
from auditlog.models import LogEntry
from auditlog.registry import auditlog
from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from audit.selectors import records_for
from audit.trail import noun
from bank.models import Card
from threads.models import Approval

# Changes recorded by the services (queryset updates auditlog does not see), besides auditlog's own per model.
SERVICE_ACTIONS = {
    Card: ["card.blocked"],
    Approval: ["approval.approved", "approval.denied", "approval.expired"],
}
SPECIAL_ACTIONS = ["api_key.revoked", "thread.renamed"]


def recorded_models() -> list[type[Model]]:
    return sorted({*auditlog.get_models(), *SERVICE_ACTIONS}, key=lambda model: model._meta.label)


def known_actions() -> list[str]:
    actions = {*SPECIAL_ACTIONS, *(name for names in SERVICE_ACTIONS.values() for name in names)}
    for model in auditlog.get_models():
        actions.update(f"{noun(model, '')}.{verb}" for verb in ("created", "updated", "deleted"))
    return sorted(actions)


class ActionFilter(admin.SimpleListFilter):
    title = "action"
    parameter_name = "audit_action"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(action, action) for action in known_actions()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[LogEntry]) -> QuerySet[LogEntry]:
        return queryset.filter(additional_data__action=self.value()) if self.value() else queryset


class ObjectTypeFilter(admin.SimpleListFilter):
    """The models the trail records, known without reading the table."""

    title = "object type"
    parameter_name = "object_type"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        types = ContentType.objects.get_for_models(*recorded_models())
        return [(str(kind.pk), model._meta.label) for model, kind in types.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[LogEntry]) -> QuerySet[LogEntry]:
        return queryset.filter(content_type_id=self.value()) if self.value() else queryset


def actor_text(entry: LogEntry) -> str:
    """`api_key ab12CD34 for <user id>`, `staff alice`, `system`."""
    data = entry.additional_data if isinstance(entry.additional_data, dict) else {}
    who = data.get("actor") if isinstance(data.get("actor"), dict) else {}
    text = " ".join(str(part) for part in (who.get("kind"), who.get("name")) if part) or "unknown"
    return f"{text} for {who['user_id']}" if who.get("user_id") else text


def action_text(entry: LogEntry) -> str:
    data = entry.additional_data if isinstance(entry.additional_data, dict) else {}
    return str(data.get("action") or entry.get_action_display())


def changes_text(entry: LogEntry) -> str:
    return "; ".join(f"{field}: {change[0]} → {change[1]}" for field, change in entry.changes_dict.items())


admin.site.unregister(LogEntry)


@admin.register(LogEntry)
class AuditRecordAdmin(LogEntryAdmin):
    list_display = ["created", "action_name", "resource_url", "actor_name", "cid", "msg_short"]
    list_filter = [ActionFilter, ObjectTypeFilter, "timestamp"]
    search_fields = ["cid", "object_pk", "object_repr", "actor__username", "additional_data"]
    readonly_fields = ["created", "action_name", "resource_url", "actor_name", "cid", "remote_addr", "msg"]
    fieldsets = [(None, {"fields": readonly_fields})]
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LogEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: LogEntry | None = None) -> bool:
        return False

    @admin.display(description="action")
    def action_name(self, entry: LogEntry) -> str:
        return action_text(entry)

    @admin.display(description="actor")
    def actor_name(self, entry: LogEntry) -> str:
        return actor_text(entry)


class AuditTrailMixin:
    """A read-only `audit trail` field on an object's admin page, its records as a table (newest first):
    `class ThreadAdmin(AuditTrailMixin, admin.ModelAdmin)`."""

    audit_trail_limit = 100

    def get_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        fields = list(super().get_fields(request, obj))
        return [*fields, "audit_trail"] if obj is not None and "audit_trail" not in fields else fields

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        return [*super().get_readonly_fields(request, obj), "audit_trail"]

    def audit_records(self, obj: Model) -> QuerySet[LogEntry]:
        """The records the page lists: the object's own; an admin may add those of what belongs to it."""
        return records_for(obj)

    @admin.display(description="audit trail")
    def audit_trail(self, obj: Model) -> SafeString | str:
        if obj.pk is None:
            return "—"
        records = list(self.audit_records(obj)[: self.audit_trail_limit + 1])
        if not records:
            return "No records yet."
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.timestamp.isoformat(timespec="seconds"),
                    action_text(entry),
                    actor_text(entry),
                    entry.cid or "",
                    changes_text(entry),
                )
                for entry in records[: self.audit_trail_limit]
            ),
        )
        more = f"Only the latest {self.audit_trail_limit} are listed." if len(records) > self.audit_trail_limit else ""
        return format_html(
            "<table><thead><tr><th>time</th><th>action</th><th>actor</th><th>request id</th><th>changes</th></tr>"
            "</thead><tbody>{}</tbody></table>{}",
            rows,
            more,
        )
