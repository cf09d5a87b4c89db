from django.apps import AppConfig


class BankagentConfig(AppConfig):
    name = "bankagent"

    def ready(self) -> None:
        from bankagent import checks  # noqa: F401 - registers the system checks
