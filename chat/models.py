import uuid

from django.conf import settings
from django.db import models


class Profile(models.Model):
    """Ties a Django login to the end-user id the API acts for: its threads and its bank customer."""

    # Not `user`: its column would be `user_id`, the name the API gives the end-user id below.
    login = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    user_id = models.UUIDField(
        "end-user id", default=uuid.uuid4, unique=True, help_text="The identity of this login's API requests."
    )

    def __str__(self) -> str:
        return f"{self.login} ({self.user_id})"
