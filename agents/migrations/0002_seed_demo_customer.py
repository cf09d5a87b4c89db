"""The demo customer of the examples: John, user 123e4567-e89b-12d3-a456-426614174000."""

from django.db import migrations

from bank.seed import demo_customer_create, demo_customer_delete


# The bank's models lived in this app when this migration ran first; `bank.seed` holds the data.
def create_demo_customer(apps, schema_editor):
    demo_customer_create(apps=apps, app_label="agents")


def remove_demo_customer(apps, schema_editor):
    demo_customer_delete(apps=apps, app_label="agents")


class Migration(migrations.Migration):
    dependencies = [("agents", "0001_initial")]

    operations = [migrations.RunPython(create_demo_customer, remove_demo_customer)]
