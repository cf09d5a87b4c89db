"""The bank's models now belong to the `bank` app: dropped from this app's migration state, tables kept."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('agents', '0002_seed_demo_customer'),
        ('bank', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name='Transaction'),
                migrations.DeleteModel(name='Card'),
                migrations.DeleteModel(name='Customer'),
            ],
        ),
    ]
