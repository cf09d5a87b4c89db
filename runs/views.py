"""What the calling end user's answers have used."""

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bankagent.schema import CALL_ERRORS, errors
from runs.serializers import UsageSerializer
from runs.spending import usage_summary


class UsageView(APIView):
    @extend_schema(operation_id="usage_retrieve", responses={200: UsageSerializer, **errors(*CALL_ERRORS)})
    def get(self, request: Request) -> Response:
        """The tokens the end user's answers used today and this month (UTC), their estimated cost, and the daily
        budget. Counted as each answer is saved: failed and cancelled answers count what they used; a deleted
        thread does not give its tokens back."""
        summary = usage_summary(
            user_id=request.user.user_id, daily_tokens=settings.USER_DAILY_TOKENS, now=timezone.now()
        )
        return Response(UsageSerializer(summary).data)
