"""The profile now belongs to the `identity` app: dropped from this app's migration state, table kept."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0001_initial'),
        ('identity', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name='Profile'),
            ],
        ),
    ]
