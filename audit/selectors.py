"""Reads of the audit trail."""

from datetime import datetime

from auditlog import get_logentry_model
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db.models import Model, Q, QuerySet

from threads.models import Approval, Thread


def records_for(obj: Model) -> QuerySet[LogEntry]:
    """The records of one object, newest first."""
    return get_logentry_model().objects.get_for_object(obj).select_related("actor").order_by("-timestamp", "-pk")


def records_for_thread(thread: Thread) -> QuerySet[LogEntry]:
    """The records of a thread and of the approvals its answers asked for, newest first."""
    approvals = [str(pk) for pk in Approval.objects.filter(message__thread=thread).values_list("pk", flat=True)]
    content_types = ContentType.objects.get_for_models(Thread, Approval)
    own = Q(content_type=content_types[Thread], object_pk=str(thread.pk))
    asked = Q(content_type=content_types[Approval], object_pk__in=approvals)
    return get_logentry_model().objects.filter(own | asked).select_related("actor").order_by("-timestamp", "-pk")


def records_between(since: datetime, until: datetime | None = None) -> QuerySet[LogEntry]:
    """The records from `since` (inclusive) to `until` (exclusive), oldest first."""
    records = get_logentry_model().objects.filter(timestamp__gte=since)
    if until is not None:
        records = records.filter(timestamp__lt=until)
    return records.select_related("content_type").order_by("timestamp", "pk")
