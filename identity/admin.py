from django.contrib import admin
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import User
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey as StockAPIKey

from identity.models import APIKey, Profile

# Keys live in identity.APIKey; the library's own table is empty, and listing it would only mislead.
admin.site.unregister(StockAPIKey)


@admin.register(APIKey)
class EventsAPIKeyAdmin(APIKeyModelAdmin):
    list_display = (*APIKeyModelAdmin.list_display, "events")
    list_filter = (*APIKeyModelAdmin.list_filter, "events")


class ProfileInline(admin.StackedInline):
    model = Profile
    can_delete = False


admin.site.unregister(User)


@admin.register(User)
class UserWithProfileAdmin(UserAdmin):
    inlines = [ProfileInline]
