from decimal import Decimal

from django.db import models


class DailyUsage(models.Model):
    """What an end user's answers used on one UTC day, counted as each answer is saved, in the answer's own
    transaction. It is what their daily budget is checked against and `GET /api/v1/usage` reports: it outlives the
    threads (a thread deleted does not give its tokens back)."""

    user_id = models.UUIDField()
    day = models.DateField()
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(
        max_digits=24,
        decimal_places=12,
        null=True,
        default=Decimal(0),
        help_text="Estimated, in USD; null once an answer of the day had a model whose price is unknown.",
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user_id", "day"], name="daily_usage_one_per_user_day")]

    def __str__(self) -> str:
        return f"{self.user_id} on {self.day}"
