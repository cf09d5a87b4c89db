from rest_framework import serializers


class UsagePeriodSerializer(serializers.Serializer):
    since = serializers.DateTimeField(help_text="The period's start: midnight UTC of the day, or of the month's first.")
    input_tokens = serializers.IntegerField(min_value=0)
    output_tokens = serializers.IntegerField(min_value=0)
    total_tokens = serializers.IntegerField(min_value=0)
    cost = serializers.DecimalField(
        max_digits=24,
        decimal_places=12,
        allow_null=True,
        normalize_output=True,
        help_text="Estimated cost in USD, from the providers' published prices; null when the price of a model that "
        "answered in the period is unknown (the demo model's is).",
    )


class UsageSerializer(serializers.Serializer):
    today = UsagePeriodSerializer(help_text="Since midnight UTC.")
    month = UsagePeriodSerializer(help_text="Since the first of the month, midnight UTC.")
    daily_tokens = serializers.IntegerField(
        allow_null=True,
        min_value=1,
        help_text="The tokens a day allows (`USER_DAILY_TOKENS`); null: no limit. Past it, a run is refused with "
        "429 `budget_exceeded` until `renews_at`.",
    )
    renews_at = serializers.DateTimeField(help_text="When today's tokens renew: the next midnight UTC.")
