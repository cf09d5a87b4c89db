import uuid

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import User
from django.db import transaction

from identity.models import Profile


def profile_user_id(*, user: AbstractBaseUser) -> uuid.UUID:
    """The end-user id of a signed-in user; a login without a profile gets one, with a fresh id."""
    profile, _ = Profile.objects.get_or_create(login=user)
    return profile.user_id


@transaction.atomic
def login_ensure(*, username: str, password: str, user_id: uuid.UUID) -> tuple[User, bool]:
    """The login `username` acting for `user_id`, created with `password` if it does not exist yet."""
    user, created = User.objects.get_or_create(username=username)
    if created:
        user.set_password(password)
        user.save(update_fields=["password"])
        Profile.objects.create(login=user, user_id=user_id)
    return user, created
