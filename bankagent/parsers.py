"""Strict JSON in, JSON out, whatever the client's headers say."""

import json
from typing import Any

from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser

from bankagent.exceptions import MalformedJson, NotAnObject, UnsupportedMediaType

MAX_DEPTH = 64
_INT64 = 2**63

NOT_UTF8 = "The request body is not valid UTF-8."
NOT_A_NUMBER = "NaN and Infinity are not JSON numbers."
OUT_OF_RANGE = (
    "Numbers must fit in 64 bits: integers from -9223372036854775808 to 9223372036854775807, "
    "other numbers within the range of a double (about 1.8e308)."
)
TOO_DEEP = f"JSON must not be nested deeper than {MAX_DEPTH} levels."

# Clients that forget the content type (`curl -d`) send these; a JSON object body is still JSON.
_LENIENT_TYPES = {"", "application/json", "text/plain", "application/x-www-form-urlencoded"}


class _Refused(ValueError):
    """Valid JSON syntax holding a value this service refuses; its message is the client's."""


def _reject_constant(name: str) -> None:
    raise _Refused(NOT_A_NUMBER)


def _parse_int(text: str) -> int:
    # Python's int() refuses more than 4,300 digits with a ValueError of its own: out of range all the same.
    if len(text) > 20 or not -_INT64 <= (value := int(text)) < _INT64:
        raise _Refused(OUT_OF_RANGE)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(OUT_OF_RANGE)
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
    """Parse JSON refusing NaN/Infinity, numbers that do not fit in 64 bits and nesting deeper than 64 levels,
    each with a message that says which (the code is `malformed_json` for all)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except UnicodeDecodeError as exc:
        raise MalformedJson(NOT_UTF8) from exc
    except _Refused as exc:
        raise MalformedJson(str(exc)) from exc
    except RecursionError as exc:
        raise MalformedJson(TOO_DEEP) from exc
    except ValueError as exc:
        raise MalformedJson() from exc
    if _depth(value) > MAX_DEPTH:
        raise MalformedJson(TOO_DEEP)
    return value


def loads_object(raw: bytes | str) -> dict[str, Any]:
    value = loads_strict(raw)
    if not isinstance(value, dict):
        raise NotAnObject()
    return value


class StrictJSONParser(BaseParser):
    """JSON, and only a JSON object. Chosen whatever the Content-Type says (JSONOnlyNegotiation), so that a JSON
    object sent as text/plain, form-encoded or without a type (`curl -d`) is still read; anything else is 415."""

    media_type = "application/json"

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
