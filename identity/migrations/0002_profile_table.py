"""The moved profile table takes this app's name, and its content type (which admin permissions and log
entries point to) follows it, so nothing granted on `chat.Profile` is lost."""

from django.db import migrations


def move_content_type(apps, schema_editor, source, target):
    ContentType = apps.get_model('contenttypes', 'ContentType')
    db = schema_editor.connection.alias
    if not ContentType.objects.using(db).filter(app_label=source, model='profile').exists():
        return  # a fresh database: post_migrate creates the content type afterwards
    # A content type created for the target in the meantime (post_migrate of a partial migrate) has only fresh
    # permissions; the source's carries whatever was granted.
    ContentType.objects.using(db).filter(app_label=target, model='profile').delete()
    ContentType.objects.using(db).filter(app_label=source, model='profile').update(app_label=target)


def forwards(apps, schema_editor):
    move_content_type(apps, schema_editor, 'chat', 'identity')


def backwards(apps, schema_editor):
    move_content_type(apps, schema_editor, 'identity', 'chat')


class Migration(migrations.Migration):

    dependencies = [
        ('identity', '0001_initial'),
        ('chat', '0002_profile_moved'),
        ('contenttypes', '0002_remove_content_type_name'),
    ]

    operations = [
        migrations.AlterModelTable(name='profile', table=None),
        migrations.RunPython(forwards, backwards),
    ]
