"""The moved tables take this app's names, and their content types (which admin permissions and log
entries point to) follow them, so nothing granted on the `agents` models is lost."""

from django.db import migrations

MODELS = ['customer', 'card', 'transaction']


def move_content_types(apps, schema_editor, source, target):
    ContentType = apps.get_model('contenttypes', 'ContentType')
    db = schema_editor.connection.alias
    for model in MODELS:
        if not ContentType.objects.using(db).filter(app_label=source, model=model).exists():
            continue  # a fresh database: post_migrate creates the content types afterwards
        # A content type created for the target in the meantime (post_migrate of a partial migrate) has only
        # fresh permissions; the source's carries whatever was granted.
        ContentType.objects.using(db).filter(app_label=target, model=model).delete()
        ContentType.objects.using(db).filter(app_label=source, model=model).update(app_label=target)


def forwards(apps, schema_editor):
    move_content_types(apps, schema_editor, 'agents', 'bank')


def backwards(apps, schema_editor):
    move_content_types(apps, schema_editor, 'bank', 'agents')


class Migration(migrations.Migration):

    dependencies = [
        ('bank', '0001_initial'),
        ('agents', '0003_bank_models_moved'),
        ('contenttypes', '0002_remove_content_type_name'),
    ]

    operations = [
        migrations.AlterModelTable(name='customer', table=None),
        migrations.AlterModelTable(name='card', table=None),
        migrations.AlterModelTable(name='transaction', table=None),
        migrations.RunPython(forwards, backwards),
    ]
