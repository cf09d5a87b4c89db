"""The bank's data, to browse: money and cards change only through the bank's own services, never here."""

from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from bank.models import Card, Customer, Transaction


class ReadOnly:
    """Viewing only, whoever asks: no adding, changing or deleting."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class CardInline(ReadOnly, admin.TabularInline):
    model = Card
    fields = ["last4", "kind", "status", "blocked_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True


class TransactionInline(ReadOnly, admin.TabularInline):
    model = Transaction
    fields = ["created_at", "description", "amount", "pending", "card"]
    readonly_fields = fields
    extra = 0
    ordering = ["-created_at"]


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    """Only the name is edited here; balances move with transactions, which the admin does not write."""

    list_display = ["name", "user_id", "balance", "pending", "currency", "cards", "blocked_cards"]
    search_fields = ["name", "user_id"]
    list_filter = ["currency"]
    fields = ["name", "user_id", "balance", "pending", "currency"]
    readonly_fields = ["user_id", "balance", "pending", "currency"]
    inlines = [CardInline, TransactionInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Customer | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Customer]:
        blocked = Count("cards", filter=Q(cards__status=Card.Status.BLOCKED))
        return super().get_queryset(request).annotate(card_count=Count("cards"), blocked_count=blocked)

    @admin.display(description="cards", ordering="card_count")
    def cards(self, customer: Customer) -> int:
        return customer.card_count

    @admin.display(description="blocked cards", ordering="blocked_count")
    def blocked_cards(self, customer: Customer) -> int:
        return customer.blocked_count


@admin.register(Card)
class CardAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ["__str__", "customer", "kind", "status", "blocked_at"]
    list_filter = ["status", "kind", ("blocked_at", admin.EmptyFieldListFilter), "blocked_at"]
    search_fields = ["last4", "customer__name", "customer__user_id"]
    list_select_related = ["customer"]
    fields = ["customer", "last4", "kind", "status", "blocked_at"]


@admin.register(Transaction)
class TransactionAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ["created_at", "customer", "card", "description", "amount", "pending"]
    list_filter = ["pending", "created_at"]
    search_fields = ["description", "customer__name", "customer__user_id", "card__last4"]
    list_select_related = ["customer", "card"]
    date_hierarchy = "created_at"
    fields = ["created_at", "customer", "card", "description", "amount", "pending"]
