"""The shape of a JSON value, for the seams that pass one along: pydantic's own recursive definition."""

from typing import TypeAlias

from pydantic import JsonValue as JSON

JSONObject: TypeAlias = dict[str, JSON]

__all__ = ["JSON", "JSONObject"]
