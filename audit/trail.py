"""The audit trail: who changed what, when, in which request, and how.

Every record is a row of auditlog's LogEntry table. The models registered with auditlog (audit.apps) are recorded
by its signals, whoever saves them: the services, the admin, commands. Changes made by queryset updates (a card
blocked, an approval decided) are recorded by `record`, called by the service in the change's transaction. Either
way `stamp` completes the row as it is written: the action's name and the actor in `additional_data`, the request
id in `cid`, the login in `actor`, the address in `remote_addr`.
"""

import datetime
import ipaddress
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import asdict

from auditlog import get_logentry_model
from auditlog.models import LogEntry
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Model
from django.http import HttpRequest
from django.utils import timezone
from django.utils.encoding import smart_str

from bankagent import context
from bankagent.context import Actor
from bankagent.jsontypes import JSON, JSONObject

SYSTEM = Actor(kind="system", name="system")
ANONYMOUS = Actor(kind="anonymous", name="")

request: ContextVar[HttpRequest | None] = ContextVar("audit_request", default=None)
"""The HTTP request being served (audit.middleware): its login, read only if a record is written, and address."""

_VERBS = {
    LogEntry.Action.CREATE: "created",
    LogEntry.Action.UPDATE: "updated",
    LogEntry.Action.DELETE: "deleted",
    LogEntry.Action.ACCESS: "accessed",
}


def request_id() -> str | None:
    """The record's correlation id (AUDITLOG_CID_GETTER): the request id of bankagent.context."""
    return context.request_id.get()


def current_actor() -> Actor:
    """Whoever acts here: the credentials of the request or socket (identity.authentication), else the Django
    login of the request (a staff user in the admin), else the process itself."""
    if (who := context.actor.get()) is not None:
        return who
    served = request.get()
    if served is None:
        return SYSTEM
    user = getattr(served, "user", None)  # read by the view already: the admin checks it first
    if not isinstance(user, AbstractBaseUser) or not user.is_authenticated:
        return ANONYMOUS
    kind = "staff" if getattr(user, "is_staff", False) else "login"
    return Actor(kind=kind, name=user.get_username(), login_id=user.pk)


def noun(model: type[Model] | None, fallback: str) -> str:
    """A model as actions name it: `thread`, `api_key`, `card`."""
    return str(model._meta.verbose_name).lower().replace(" ", "_") if model is not None else fallback


def action_name(entry: LogEntry) -> str:
    """What auditlog recorded, as `<noun>.<verb>`; a key revoked and a thread renamed are named so."""
    what = noun(entry.content_type.model_class(), entry.content_type.model)
    changes = entry.changes or {}
    if entry.action == LogEntry.Action.UPDATE:
        if what == "api_key" and list(changes.get("revoked") or ()) == [False, True]:
            return "api_key.revoked"
        if what == "thread" and "title" in changes:
            return "thread.renamed"
    return f"{what}.{_VERBS.get(entry.action, 'changed')}"


def _address(served: HttpRequest | None) -> str | None:
    """The peer's address as the server saw it (not a forwarded header a client can write), when it is one."""
    raw = served.META.get("REMOTE_ADDR") if served is not None else None
    try:
        return str(ipaddress.ip_address(raw)) if raw else None
    except ValueError:
        return None


def stamp(sender: type[LogEntry], instance: LogEntry, raw: bool = False, **kwargs: object) -> None:
    """Completes a record as it is first written (pre_save of LogEntry): action, actor, login and address."""
    if raw or instance.pk is not None:
        return
    who = current_actor()
    data = dict(instance.additional_data) if isinstance(instance.additional_data, dict) else {}
    data.setdefault("action", action_name(instance))
    data.setdefault("actor", asdict(who))
    instance.additional_data = data
    if instance.actor_id is None and who.login_id is not None:
        instance.actor_id = who.login_id
    if instance.remote_addr is None:
        instance.remote_addr = _address(request.get())


def plain(value: object) -> JSON:
    """A value as auditlog's JSON changes hold it (a date-time as its naive UTC text), so that records of both
    kinds read alike."""
    if isinstance(value, datetime.datetime):
        if timezone.is_aware(value):
            value = timezone.make_naive(value, datetime.UTC)
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return smart_str(value)


def record(
    obj: Model, action: str, changes: Mapping[str, tuple[object, object]], *, actor: Actor | None = None
) -> LogEntry:
    """Record `action` on `obj` with what it changed (field: before, after), as `actor`, by default whoever acts
    here. Call it inside the change's transaction: a change rolled back leaves no record."""
    data: JSONObject = {"action": action}
    if actor is not None:
        data["actor"] = asdict(actor)
    return get_logentry_model().objects.log_create(
        obj,
        force_log=True,
        action=LogEntry.Action.UPDATE,
        changes={field: [plain(before), plain(after)] for field, (before, after) in changes.items()},
        additional_data=data,
    )


def hidden(value: str) -> str:
    """How a masked field (a password's hash) is recorded: that it changed, nothing of it."""
    return "(hidden)"
