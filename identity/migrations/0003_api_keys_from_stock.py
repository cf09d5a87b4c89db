"""Every key of the library's stock table moves to `identity.APIKey`, unchanged and with the standard event
dialect, so existing clients keep authenticating and a key lives in one place. Backwards, keys move back and
lose their dialect."""

from django.db import migrations

FIELDS = ['id', 'prefix', 'hashed_key', 'created', 'name', 'revoked', 'expiry_date']


def move_keys(source, target, db):
    keys = list(source.objects.using(db).all())
    target.objects.using(db).bulk_create(target(**{name: getattr(key, name) for name in FIELDS}) for key in keys)
    # `created` is auto_now_add, which the insert above stamped with the current time: restore each original.
    for key in keys:
        target.objects.using(db).filter(pk=key.pk).update(created=key.created)
    source.objects.using(db).all().delete()


def forwards(apps, schema_editor):
    stock, own = apps.get_model('rest_framework_api_key', 'APIKey'), apps.get_model('identity', 'APIKey')
    move_keys(stock, own, schema_editor.connection.alias)


def backwards(apps, schema_editor):
    stock, own = apps.get_model('rest_framework_api_key', 'APIKey'), apps.get_model('identity', 'APIKey')
    move_keys(own, stock, schema_editor.connection.alias)


class Migration(migrations.Migration):

    dependencies = [
        ('identity', '0002_profile_table'),
        ('rest_framework_api_key', '0005_auto_20220110_1102'),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]
