"""The AI SDK's UI message stream read with pydantic-ai's own models of its chunks: for the tests of the endpoint
that speaks it, and for the fuzzer's check of its answers."""

import functools
import operator
from typing import Annotated

from pydantic import Discriminator, Tag, TypeAdapter
from pydantic_ai.ui.vercel_ai import response_types
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk, DataChunk, DoneChunk


def _chunk_tag(value: object) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "data" if isinstance(kind, str) and kind.startswith("data-") else kind


_MODELS = [
    cls
    for cls in vars(response_types).values()
    if isinstance(cls, type) and issubclass(cls, BaseChunk) and cls not in (BaseChunk, DataChunk, DoneChunk)
]
# Every chunk model is tagged by its `type`; data parts share one model, whatever their name after `data-`.
_TAGGED = [
    Annotated[DataChunk, Tag("data")],
    *(Annotated[cls, Tag(cls.model_fields["type"].default)] for cls in _MODELS),
]
CHUNK = TypeAdapter(Annotated[functools.reduce(operator.or_, _TAGGED), Discriminator(_chunk_tag)])


def chunks_of(body: bytes, *, whole: bool = True) -> list[BaseChunk]:
    """Every event of a stream as its AI SDK chunk: each is `data: <JSON>` and a blank line, the last one (and only
    it) `data: [DONE]`. A chunk no model of pydantic-ai's validates raises ValidationError. A stream the reader cut
    short (`whole=False`) is read up to its last complete event, and may lack its end."""
    *events, rest = body.decode().split("\n\n")
    if rest and whole:
        raise ValueError(f"the stream does not end with a blank line: {rest!r}")
    chunks: list[BaseChunk] = []
    for event in events:
        if not event.startswith("data: "):
            raise ValueError(f"not a data event: {event!r}")
        data = event.removeprefix("data: ")
        chunks.append(DoneChunk() if data == "[DONE]" else CHUNK.validate_json(data))
    types = [chunk.type for chunk in chunks]
    if types.count("done") > 1 or "done" in types[:-1] or (whole and types[-1:] != ["done"]):
        raise ValueError(f"the stream does not end with its one [DONE]: {types}")
    if whole and (types[:1] != ["start"] or types[-2:-1] != ["finish"]):
        raise ValueError(f"the stream does not start with start and end with finish: {types}")
    return chunks
