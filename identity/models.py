"""Who may call: API keys for services, and the profile that gives a Django login its end-user id."""

import uuid

from django.conf import settings
from django.db import models
from rest_framework_api_key.models import AbstractAPIKey


class APIKey(AbstractAPIKey):
    """A service's key; only its hash is stored."""

    class Events(models.TextChoices):
        STANDARD = "standard", "standard"
        LEGACY = "legacy", "legacy: deltas named `token`, and no tool events"

    events = models.CharField(
        max_length=10,
        choices=Events.choices,
        default=Events.STANDARD,
        help_text="The event dialect of this key's streams; legacy is for clients of the service this one replaces.",
    )

    class Meta(AbstractAPIKey.Meta):
        verbose_name = "API key"
        verbose_name_plural = "API keys"


class Profile(models.Model):
    """Ties a Django login to the end-user id the API acts for: its threads and its bank customer."""

    # Not `user`: its column would be `user_id`, the name the API gives the end-user id below.
    login = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    user_id = models.UUIDField(
        "end-user id", default=uuid.uuid4, unique=True, help_text="The identity of this login's API requests."
    )

    def __str__(self) -> str:
        return f"{self.login} ({self.user_id})"
