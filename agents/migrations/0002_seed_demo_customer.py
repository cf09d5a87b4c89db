"""The demo customer of the examples: John, user 123e4567-e89b-12d3-a456-426614174000."""

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from django.db import migrations

DEMO_USER_ID = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")
TODAY = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
TRANSACTIONS = [
    ("Corner Coffee", "-4.50", 0, True),
    ("City Grocery", "-62.18", 1, False),
    ("Salary, Acme Corp", "2450.00", 3, False),
    ("Metro transit pass", "-45.00", 4, False),
    ("Online bookstore", "-23.99", 6, False),
]


def create_demo_customer(apps, schema_editor):
    Customer = apps.get_model("agents", "Customer")
    Card = apps.get_model("agents", "Card")
    Transaction = apps.get_model("agents", "Transaction")
    customer, created = Customer.objects.get_or_create(
        user_id=DEMO_USER_ID, defaults={"name": "John", "balance": Decimal("1123.45"), "pending": Decimal("-4.50")}
    )
    if not created:
        return
    card = Card.objects.create(customer=customer, last4="4242", kind="debit")
    Transaction.objects.bulk_create(
        Transaction(
            customer=customer,
            card=card,
            description=description,
            amount=Decimal(amount),
            pending=pending,
            created_at=TODAY - timedelta(days=days_ago),
        )
        for description, amount, days_ago, pending in TRANSACTIONS
    )


def remove_demo_customer(apps, schema_editor):
    apps.get_model("agents", "Customer").objects.filter(user_id=DEMO_USER_ID).delete()


class Migration(migrations.Migration):
    dependencies = [("agents", "0001_initial")]

    operations = [migrations.RunPython(create_demo_customer, remove_demo_customer)]
