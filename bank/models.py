"""The bank's customer data that the bank support agent's tools look up."""

import uuid
from decimal import Decimal

from django.db import models

# The customer the data migration seeds (`bank.seed`), whom the examples and the demo login act for.
DEMO_USER_ID = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")


class Customer(models.Model):
    user_id = models.UUIDField(unique=True, help_text="The X-User-ID this customer signs in as.")
    name = models.CharField(max_length=100)
    balance = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0"))
    pending = models.DecimalField(
        max_digits=14, decimal_places=2, default=Decimal("0"), help_text="Sum of authorised, unsettled amounts."
    )
    currency = models.CharField(max_length=3, default="USD")

    def __str__(self) -> str:
        return self.name


class Card(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        BLOCKED = "blocked"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="cards")
    last4 = models.CharField(max_length=4)
    kind = models.CharField(max_length=20, default="debit")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    blocked_at = models.DateTimeField(null=True, blank=True, help_text="When the card was blocked, if it is.")

    def __str__(self) -> str:
        return f"{self.kind} card •••• {self.last4}"


class Transaction(models.Model):
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="transactions")
    card = models.ForeignKey(Card, on_delete=models.SET_NULL, null=True, blank=True, related_name="transactions")
    description = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=14, decimal_places=2, help_text="Negative for money going out.")
    pending = models.BooleanField(default=False)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["customer", "-created_at"], name="transaction_recent")]

    def __str__(self) -> str:
        return f"{self.description} {self.amount}"
