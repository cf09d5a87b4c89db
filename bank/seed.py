"""The demo customer of the examples: John, with a debit card and a few recent transactions."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.apps import apps as installed_apps
from django.apps.registry import Apps

from bank.models import DEMO_USER_ID

TODAY = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TRANSACTIONS = [
    ("Corner Coffee", "-4.50", 0, True),
    ("City Grocery", "-62.18", 1, False),
    ("Salary, Acme Corp", "2450.00", 3, False),
    ("Metro transit pass", "-45.00", 4, False),
    ("Online bookstore", "-23.99", 6, False),
]


def demo_customer_create(*, apps: Apps = installed_apps, app_label: str = "bank") -> None:
    """Create John once; an existing John is left as he is.

    Models come from `apps` so that a data migration can pass its historical ones, under the app that held
    them at that point of the migration history.
    """
    Customer = apps.get_model(app_label, "Customer")
    Card = apps.get_model(app_label, "Card")
    Transaction = apps.get_model(app_label, "Transaction")
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


def demo_customer_delete(*, apps: Apps = installed_apps, app_label: str = "bank") -> None:
    apps.get_model(app_label, "Customer").objects.filter(user_id=DEMO_USER_ID).delete()
