"""Log lines that say where they come from: plain text by default, one JSON object a line with LOG_FORMAT=json.

`ContextFilter` puts the request, user, thread and run ids known where a line is logged (`bankagent.context`) on
its record, as `request_id`, `user_id`, `thread_id` and `run_id`: the JSON formatter writes them as fields, the
plain one after the message, `[request_id=… thread_id=…]`. A line says no message content and no secret: what is
logged passes ids, codes and counts, never a question, an answer, a key or a ticket.
"""

import logging

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

FIELDS = ("request_id", "user_id", "thread_id", "run_id")
"""`bankagent.context.FIELDS`, in the order lines show them: that module cannot be imported while logging is set
up, before Django's applications are loaded."""


class ContextFilter(logging.Filter):
    """Adds the ids known where the record was logged to it; an id the caller passed itself (`extra=`) stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bankagent.context import current  # not at the top: see FIELDS

        for name, value in current().items():
            record.__dict__.setdefault(name, value)
        return True


class PlainFormatter(logging.Formatter):
    """The format given, then the ids known, when there are any."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        known = " ".join(f"{name}={value}" for name in FIELDS if (value := record.__dict__.get(name)) is not None)
        return f"{line} [{known}]" if known else line


class JSONFormatter(JsonFormatter):
    """`{"time", "level", "logger", "message", ...the ids known, "exc_info"}`, one object a line."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            timestamp="time",
            rename_fields={"levelname": "level", "name": "logger"},
            # Django passes the request object with a request's lines: its path is in the message already.
            reserved_attrs=[*RESERVED_ATTRS, "request"],
        )
