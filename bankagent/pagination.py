"""Keyset pagination with signed cursors, announced in an RFC 8288 `Link` header.

A cursor is the position of the last item served, so items created meanwhile never shift a page, and it is
signed, so a cursor the server did not issue is refused rather than interpreted.
"""

from collections.abc import Sequence

from django.core import signing
from django.core.exceptions import ValidationError
from django.db.models import Model, Q, QuerySet
from rest_framework.request import Request
from rest_framework.utils.urls import replace_query_param

from bankagent.exceptions import InvalidCursor, InvalidLimit

MAX_LIMIT = 100


def parse_limit(raw: str | None, *, default: int) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidLimit()
    return int(raw)


class KeysetPaginator:
    """Pages a queryset in descending order of `fields`, the last of which must be unique."""

    def __init__(self, *, fields: Sequence[str], salt: str, default_limit: int = 20) -> None:
        self.fields = tuple(fields)
        self.salt = f"bankagent.pagination.{salt}"
        self.default_limit = default_limit

    def page(self, request: Request, queryset: QuerySet) -> tuple[list[Model], dict[str, str]]:
        """The page's items, newest first, and the headers announcing the next page."""
        limit = parse_limit(request.query_params.get("limit"), default=self.default_limit)
        cursor = request.query_params.get("cursor")
        if cursor is not None:
            queryset = queryset.filter(self._after(queryset.model, cursor))
        rows = list(queryset.order_by(*(f"-{field}" for field in self.fields))[: limit + 1])
        if len(rows) <= limit:
            return rows, {}
        rows = rows[:limit]
        token = signing.dumps([str(getattr(rows[-1], field)) for field in self.fields], salt=self.salt)
        url = replace_query_param(request.build_absolute_uri(), "cursor", token)
        url = replace_query_param(url, "limit", limit)
        return rows, {"Link": f'<{url}>; rel="next"'}

    def _after(self, model: type[Model], cursor: str) -> Q:
        try:
            raw = signing.loads(cursor, salt=self.salt)
            if not isinstance(raw, list) or len(raw) != len(self.fields):
                raise ValueError("cursor shape")
            values = [model._meta.get_field(f).to_python(v) for f, v in zip(self.fields, raw, strict=True)]
        except (signing.BadSignature, ValueError, TypeError, ValidationError) as exc:
            raise InvalidCursor() from exc
        # (a, b) < (va, vb) spelled out, so that every database can use the index.
        condition, equal = Q(), Q()
        for field, value in zip(self.fields, values, strict=True):
            condition |= equal & Q(**{f"{field}__lt": value})
            equal &= Q(**{field: value})
        return condition
