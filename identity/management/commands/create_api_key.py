from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from bankagent.context import Actor, acting
from identity.models import APIKey


class Command(BaseCommand):
    help = "Create an API key and print it once: only its hash is stored. The raw key is the last line of output."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="What the key is for (at most 50 characters).")
        parser.add_argument("--expires-in-days", type=int, help="Make the key expire after this many days.")
        parser.add_argument(
            "--if-none", action="store_true", help="Do nothing if a usable key of this name already exists."
        )
        parser.add_argument(
            "--events",
            choices=APIKey.Events.values,
            default=APIKey.Events.STANDARD,
            help="The event dialect of the key's streams: legacy is for clients of the service this one replaces.",
        )

    def handle(
        self, *args: object, name: str, expires_in_days: int | None, if_none: bool, events: str, **options: object
    ) -> None:
        if not 1 <= len(name) <= 50:
            raise CommandError("The name must be 1 to 50 characters long.")
        if expires_in_days is not None and expires_in_days < 1:
            raise CommandError("--expires-in-days must be at least 1.")
        unexpired = Q(expiry_date__isnull=True) | Q(expiry_date__gt=timezone.now())
        if if_none and APIKey.objects.get_usable_keys().filter(unexpired, name=name).exists():
            self.stdout.write(f"An API key named {name!r} exists already; its key was printed when it was created.")
            return
        expiry = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        # The key and its audit record are saved together, or neither is.
        with acting(Actor(kind="command", name="create_api_key")), transaction.atomic():
            _, key = APIKey.objects.create_key(name=name, expiry_date=expiry, events=events)
        self.stdout.write(
            f"Created API key {name!r}"
            + (f", expiring {expiry:%Y-%m-%d %H:%M} UTC" if expiry else "")
            + (f", with {events} events" if events != APIKey.Events.STANDARD else "")
        )
        self.stdout.write(key)
