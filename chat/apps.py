from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat page"
    default_auto_field = "django.db.models.BigAutoField"
