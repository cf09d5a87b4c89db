"""Rate limits, counted in the cache (Redis when REDIS_URL is set, so across processes), with rates from
THROTTLE_RATES. A scope without a rate (THROTTLE_RATES=off) lets everything through without touching the cache.
While Redis is down each process counts on its own, so the limits still hold per process and no request fails
for want of a counter.
"""

import logging
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, ClassVar

from django.conf import settings
from django.core.cache.backends.locmem import LocMemCache
from redis.exceptions import RedisError
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from bankagent.exceptions import Throttled
from bankagent.metrics import record_refusal
from identity.authentication import Principal

if TYPE_CHECKING:  # DRF's views import the throttle classes their settings name
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

PROCESS_COUNTS = LocMemCache("throttles", {"OPTIONS": {"MAX_ENTRIES": 100_000}})
"""Where this process counts while the shared cache is down."""
SHARED_COUNTS_RETRY_SECONDS = 5.0
"""Once Redis has failed, how long the process counts on its own before asking Redis again: a Redis that does not
answer would otherwise hold every request for its timeout."""


class PrincipalRateThrottle(SimpleRateThrottle):
    shared_counts_down_until: ClassVar[float] = 0.0

    def allow_request(self, request: Request, view: "APIView | None") -> bool:
        if self.timer() < PrincipalRateThrottle.shared_counts_down_until:
            self.cache = PROCESS_COUNTS
            return super().allow_request(request, view)
        try:
            return super().allow_request(request, view)
        except RedisError as exc:
            logger.warning("Counting %s in this process: Redis is unavailable (%s)", self.scope, exc)
            PrincipalRateThrottle.shared_counts_down_until = self.timer() + SHARED_COUNTS_RETRY_SECONDS
            self.cache = PROCESS_COUNTS
            return super().allow_request(request, view)

    def throttle_failure(self) -> bool:
        record_refusal("throttled", self.scope)
        return super().throttle_failure()

    def get_rate(self) -> str | None:
        return settings.THROTTLE_RATES.get(self.scope)

    def get_cache_key(self, request: Request, view: "APIView | None") -> str | None:
        principal = request.user
        if not isinstance(principal, Principal):
            return None  # nobody to count (health, schema)
        ident = self.ident_of(principal)
        return None if ident is None else self.cache_format % {"scope": self.scope, "ident": ident}

    def ident_of(self, principal: Principal) -> str | None:
        raise NotImplementedError


class KeyRateThrottle(PrincipalRateThrottle):
    """Every request, per API key (a signed-in user of the chat page counts as its own key)."""

    scope = "key"

    def ident_of(self, principal: Principal) -> str | None:
        return principal.api_key_id or f"user-{principal.user_id}"


class RunsUserRateThrottle(PrincipalRateThrottle):
    """Runs started, per end user."""

    scope = "runs_user"

    def ident_of(self, principal: Principal) -> str | None:
        return str(principal.user_id)


class RunsKeyRateThrottle(PrincipalRateThrottle):
    """Runs started, per API key."""

    scope = "runs_key"

    def ident_of(self, principal: Principal) -> str | None:
        return principal.api_key_id


RUN_THROTTLES = [KeyRateThrottle, RunsUserRateThrottle, RunsKeyRateThrottle]


def throttling_on() -> bool:
    return bool(settings.THROTTLE_RATES)


def check_run_throttles(principal: Principal) -> None:
    """For a run started outside DRF (a websocket query): raises Throttled, with the wait, past any rate."""
    request = SimpleNamespace(user=principal)
    waits = [
        throttle.wait()
        for throttle in (cls() for cls in RUN_THROTTLES)
        if not throttle.allow_request(request, None)  # type: ignore[arg-type]
    ]
    if waits:
        error = Throttled()
        error.retry_after = max(1, math.ceil(max((wait or 0) for wait in waits)))
        raise error
