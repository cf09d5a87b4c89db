from django.contrib import admin

from bank.models import Card, Customer, Transaction


class CardInline(admin.TabularInline):
    model = Card
    fields = ["last4", "kind", "status", "blocked_at"]
    extra = 0


class TransactionInline(admin.TabularInline):
    model = Transaction
    extra = 0
    ordering = ["-created_at"]


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ["name", "user_id", "balance", "pending", "currency"]
    search_fields = ["name", "user_id"]
    inlines = [CardInline, TransactionInline]
