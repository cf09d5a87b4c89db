"""The AG-UI event stream read with the ag-ui-protocol package's own models of its events: for the tests of the
endpoint that speaks it, and for the fuzzer's check of its answers."""

from ag_ui.core import BaseEvent, Event, EventType
from pydantic import TypeAdapter

EVENT = TypeAdapter(Event)
ENDS = (EventType.RUN_FINISHED, EventType.RUN_ERROR)


def events_of(body: bytes, *, whole: bool = True) -> list[BaseEvent]:
    """Every event of a stream as its AG-UI event: each is `data: <JSON>` and a blank line. An event no model of
    the package validates raises ValidationError. The stream starts with RUN_STARTED and its one end, RUN_FINISHED
    or RUN_ERROR, is its last event. A stream the reader cut short (`whole=False`) is read up to its last complete
    event, and may lack its end."""
    *frames, rest = body.decode().split("\n\n")
    if rest and whole:
        raise ValueError(f"the stream does not end with a blank line: {rest!r}")
    events: list[BaseEvent] = []
    for frame in frames:
        if not frame.startswith("data: "):
            raise ValueError(f"not a data event: {frame!r}")
        events.append(EVENT.validate_json(frame.removeprefix("data: ")))
    types = [event.type for event in events]
    if types[:1] != [EventType.RUN_STARTED] and (whole or types):
        raise ValueError(f"the stream does not start with RUN_STARTED: {types}")
    ends = [i for i, kind in enumerate(types) if kind in ENDS]
    if ends[:-1] or (ends and ends[0] != len(types) - 1) or (whole and not ends):
        raise ValueError(f"the stream does not end with its one RUN_FINISHED or RUN_ERROR: {types}")
    return events
