"""Reads of the audit trail."""

from datetime import datetime

from auditlog import get_logentry_model
from auditlog.models import LogEntry
from django.db.models import Model, QuerySet


def records_for(obj: Model) -> QuerySet[LogEntry]:
    """The records of one object, newest first."""
    return get_logentry_model().objects.get_for_object(obj).select_related("actor").order_by("-timestamp", "-pk")


def records_between(since: datetime, until: datetime | None = None) -> QuerySet[LogEntry]:
    """The records from `since` (inclusive) to `until` (exclusive), oldest first."""
    records = get_logentry_model().objects.filter(timestamp__gte=since)
    if until is not None:
        records = records.filter(timestamp__lt=until)
    return records.select_related("content_type").order_by("timestamp", "pk")
