import json
from datetime import UTC, datetime, time

from auditlog.models import LogEntry
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from audit.selectors import records_between
from bankagent.jsontypes import JSONObject


def moment(option: str, raw: str) -> datetime:
    """An ISO date (midnight UTC) or date-time (UTC unless it names its offset)."""
    try:
        when = parse_datetime(raw)
        if when is None and (day := parse_date(raw)) is not None:
            when = datetime.combine(day, time())
    except ValueError:
        when = None  # well formed but impossible, such as a 30th of February
    if when is None:
        raise CommandError(
            f"{option} must be an ISO date or date-time, such as 2026-01-31 or 2026-01-31T12:00:00Z, not {raw!r}."
        )
    return when if timezone.is_aware(when) else timezone.make_aware(when, UTC)


def exported(entry: LogEntry) -> JSONObject:
    data = entry.additional_data if isinstance(entry.additional_data, dict) else {}
    return {
        "id": entry.pk,
        "time": entry.timestamp.isoformat(),
        "action": data.get("action"),
        "object_type": f"{entry.content_type.app_label}.{entry.content_type.model}",
        "object_id": entry.object_pk,
        "object_repr": entry.object_repr,
        "actor": data.get("actor"),
        "request_id": entry.cid,
        "changes": entry.changes_dict,
        "remote_addr": entry.remote_addr,
    }


class Command(BaseCommand):
    help = (
        "Write the audit records from --since (inclusive) to --until (exclusive) as JSON lines, oldest first: id, "
        "time, action, object_type, object_id, object_repr, actor, request_id, changes, remote_addr."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", required=True, help="An ISO date or date-time (UTC unless it says).")
        parser.add_argument("--until", help="An ISO date or date-time (UTC unless it says); default: now.")

    def handle(self, *args: object, since: str, until: str | None, **options: object) -> None:
        start = moment("--since", since)
        end = moment("--until", until) if until is not None else None
        if end is not None and end <= start:
            raise CommandError("--until must be later than --since.")
        for entry in records_between(start, end).iterator(chunk_size=1000):
            self.stdout.write(json.dumps(exported(entry), ensure_ascii=False))
