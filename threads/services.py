"""Writes: every change a client makes to its threads goes through these functions (runs write through
`runs.services`). Each is one transaction with its audit record (auditlog records Thread's changes): both are saved,
or neither."""

import uuid

from django.db import transaction

from bankagent.jsontypes import JSONObject
from threads.models import Thread


class _Unset:
    """The default of an optional argument that may also be given as None."""


UNSET = _Unset()


@transaction.atomic
def thread_create(
    *, user_id: uuid.UUID, agent_type: str, title: str | None = None, metadata: JSONObject | None = None
) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type=agent_type, title=title, metadata=metadata or {})


@transaction.atomic
def thread_update(
    *, thread: Thread, title: str | _Unset | None = UNSET, metadata: JSONObject | _Unset = UNSET
) -> Thread:
    """Change the client-editable fields given; `title=None` clears the title."""
    fields = []
    if not isinstance(title, _Unset):
        thread.title = title
        fields.append("title")
    if not isinstance(metadata, _Unset):
        thread.metadata = metadata
        fields.append("metadata")
    if fields:
        thread.save(update_fields=[*fields, "updated_at"])
    return thread


@transaction.atomic
def thread_delete(*, thread: Thread) -> None:
    thread.delete()
