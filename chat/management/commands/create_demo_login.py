from django.core.management.base import BaseCommand, CommandError
from django.utils.crypto import salted_hmac

from bank.models import DEMO_USER_ID
from identity.models import Profile
from identity.services import login_ensure

USERNAME = "demo"


def demo_password() -> str:
    # Derived from SECRET_KEY rather than random, so every run can print it again without storing it anywhere.
    return salted_hmac("bankagent.chat.demo-login", USERNAME).hexdigest()[:20]


class Command(BaseCommand):
    help = "Create, once, the chat page's demo login, acting for the demo customer, and print its credentials."

    def handle(self, *args: object, **options: object) -> None:
        owner = Profile.objects.filter(user_id=DEMO_USER_ID).exclude(login__username=USERNAME).first()
        if owner is not None:
            raise CommandError(f"The demo customer already belongs to the login {owner.login.get_username()!r}.")
        password = demo_password()
        user, created = login_ensure(username=USERNAME, password=password, user_id=DEMO_USER_ID)
        if not created and not user.check_password(password):
            self.stdout.write(
                f"The demo login {USERNAME!r} exists with another password; "
                f"set one with: python manage.py changepassword {USERNAME}"
            )
            return
        self.stdout.write(f"{'Created the' if created else 'The'} demo login: username {USERNAME}, password {password}")
