"""What end users' answers use: counted per user and UTC day as each answer is saved, checked against their daily
budget before a run starts, and reported by `GET /api/v1/usage`.

The check at a run's start is a read: runs already started when the budget is reached still finish, so a user may
go past it by at most what those runs use.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q, Sum

from bankagent.exceptions import BudgetExceeded
from runs.models import DailyUsage


@dataclass(frozen=True)
class Spending:
    """What one run's model requests used."""

    user_id: uuid.UUID
    input_tokens: int
    output_tokens: int
    cost: Decimal | None
    """Estimated, in USD; None when the price of a model that answered is unknown."""


@dataclass(frozen=True)
class Usage:
    since: datetime
    input_tokens: int
    output_tokens: int
    cost: Decimal | None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class UsageSummary:
    today: Usage
    month: Usage
    daily_tokens: int | None
    renews_at: datetime


def _day(now: datetime) -> date:
    return now.astimezone(UTC).date()


def renewal(now: datetime) -> datetime:
    """When the day's budget renews: the next midnight, UTC."""
    return datetime.combine(_day(now) + timedelta(days=1), time(), tzinfo=UTC)


def usage_count(spending: Spending, *, now: datetime) -> None:
    """Add a run's use to its user's day, in the caller's transaction. Increments in the database: runs ending at the
    same moment each add theirs. A cost unknown makes the day's cost unknown (SQL's NULL + x is NULL)."""
    day = DailyUsage.objects.filter(user_id=spending.user_id, day=_day(now))
    added = {
        "input_tokens": F("input_tokens") + spending.input_tokens,
        "output_tokens": F("output_tokens") + spending.output_tokens,
        "cost": None if spending.cost is None else F("cost") + spending.cost,
    }
    if day.update(**added):
        return
    try:
        with transaction.atomic():
            DailyUsage.objects.create(
                user_id=spending.user_id,
                day=_day(now),
                input_tokens=spending.input_tokens,
                output_tokens=spending.output_tokens,
                cost=spending.cost,
            )
    except IntegrityError:
        day.update(**added)  # another run created the day's row meanwhile


def budget_check(*, user_id: uuid.UUID, daily_tokens: int | None, now: datetime) -> None:
    """Raise BudgetExceeded when the user has used their tokens of the day (UTC)."""
    if daily_tokens is None:
        return
    used = (
        DailyUsage.objects.filter(user_id=user_id, day=_day(now))
        .values_list(F("input_tokens") + F("output_tokens"), flat=True)
        .first()
    )
    if used is not None and used >= daily_tokens:
        raise BudgetExceeded(limit=daily_tokens, used=used, renews_at=renewal(now), now=now)


def usage_summary(*, user_id: uuid.UUID, daily_tokens: int | None, now: datetime) -> UsageSummary:
    """The user's use today and this month (UTC), in one query."""
    today = _day(now)
    first = today.replace(day=1)
    is_today = Q(day=today)
    totals = DailyUsage.objects.filter(user_id=user_id, day__gte=first, day__lte=today).aggregate(
        input_today=Sum("input_tokens", filter=is_today, default=0),
        output_today=Sum("output_tokens", filter=is_today, default=0),
        cost_today=Sum("cost", filter=is_today, default=Decimal(0)),
        unpriced_today=Count("pk", filter=is_today & Q(cost=None)),
        input_month=Sum("input_tokens", default=0),
        output_month=Sum("output_tokens", default=0),
        cost_month=Sum("cost", default=Decimal(0)),
        unpriced_month=Count("pk", filter=Q(cost=None)),
    )

    def usage(since: date, period: str) -> Usage:
        # SUM skips NULLs: a period with any answer of unknown price has an unknown cost.
        cost = None if totals[f"unpriced_{period}"] else Decimal(totals[f"cost_{period}"])
        return Usage(
            since=datetime.combine(since, time(), tzinfo=UTC),
            input_tokens=totals[f"input_{period}"],
            output_tokens=totals[f"output_{period}"],
            cost=cost,
        )

    return UsageSummary(
        today=usage(today, "today"),
        month=usage(first, "month"),
        daily_tokens=daily_tokens,
        renews_at=renewal(now),
    )
