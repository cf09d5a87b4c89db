"""The "Reviewers" group: staff in it read the conversations (threads, messages, approvals) and the bank's data in
the admin, and change nothing."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

REVIEWERS = 'Reviewers'
VIEWS = {
    'threads': ['view_thread', 'view_message', 'view_approval'],
    'bank': ['view_customer', 'view_card', 'view_transaction'],
}


def create_reviewers(apps, schema_editor):
    db = schema_editor.connection.alias
    for app_label in VIEWS:
        app_config = apps.get_app_config(app_label)
        # On a fresh database the permissions are otherwise created only after every migration (post_migrate),
        # which skips the historical apps' stubs unless they say they have models.
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0, using=db)
    Group = apps.get_model('auth', 'Group')
    Permission = apps.get_model('auth', 'Permission')
    reviewers, _ = Group.objects.using(db).get_or_create(name=REVIEWERS)
    for app_label, codenames in VIEWS.items():
        permissions = Permission.objects.using(db).filter(content_type__app_label=app_label, codename__in=codenames)
        reviewers.permissions.add(*permissions)


def remove_reviewers(apps, schema_editor):
    apps.get_model('auth', 'Group').objects.using(schema_editor.connection.alias).filter(name=REVIEWERS).delete()


class Migration(migrations.Migration):

    dependencies = [
        ('threads', '0005_approvals'),
        ('bank', '0003_card_blocked_at'),
        ('auth', '0012_alter_user_first_name_max_length'),
        ('contenttypes', '0002_remove_content_type_name'),
    ]

    operations = [migrations.RunPython(create_reviewers, remove_reviewers)]
