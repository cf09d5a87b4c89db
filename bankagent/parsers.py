"""Strict JSON in, JSON out, whatever the client's headers say."""

import json
from typing import Any

from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser

from bankagent.exceptions import MalformedJson, NotAnObject, UnsupportedMediaType

MAX_DEPTH = 64
_INT64 = 2**63

# Clients that forget the content type (`curl -d`) send these; a JSON object body is still JSON.
_LENIENT_TYPES = {"", "application/json", "text/plain", "application/x-www-form-urlencoded"}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int:
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise ValueError("integer out of range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item)
    return deepest


def loads_strict(raw: bytes | str) -> Any:
    """Parse JSON refusing NaN/Infinity, overflowing numbers and nesting deeper than 64 levels."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except UnicodeDecodeError as exc:
        raise MalformedJson("The request body is not valid UTF-8.") from exc
    except (ValueError, RecursionError) as exc:
        raise MalformedJson() from exc
    if _depth(value) > MAX_DEPTH:
        raise MalformedJson(f"JSON is nested deeper than {MAX_DEPTH} levels.")
    return value


def loads_object(raw: bytes | str) -> dict[str, Any]:
    value = loads_strict(raw)
    if not isinstance(value, dict):
        raise NotAnObject()
    return value


class StrictJSONParser(BaseParser):
    media_type = "*/*"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> dict[str, Any]:
        content_type = (media_type or "").split(";")[0].strip().lower()
        if content_type not in _LENIENT_TYPES:
            raise UnsupportedMediaType()
        raw = stream.read()
        if content_type == "application/x-www-form-urlencoded" and not raw.lstrip().startswith((b"{", b"[")):
            raise UnsupportedMediaType("Form fields are not accepted: send a JSON object.")
        return loads_object(raw)


class JSONOnlyNegotiation(BaseContentNegotiation):
    """Every answer is JSON; an Accept header asking for HTML or XML does not change that."""

    def select_parser(self, request: Any, parsers: list[BaseParser]) -> BaseParser:
        return parsers[0]

    def select_renderer(self, request: Any, renderers: list, format_suffix: str | None = None) -> tuple:
        return renderers[0], renderers[0].media_type
