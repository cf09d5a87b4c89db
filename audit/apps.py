from django.apps import AppConfig, apps
from django.db.models.signals import pre_save

# The models auditlog records, whoever saves them, and the fields it leaves out of their records besides the primary
# key (the record's object id): bookkeeping, and a key's hash. Reverse relations are never read; a password is
# recorded as `(hidden)` (AUDITLOG_MASK_CALLABLE).
TRACKED: dict[str, tuple[str, ...]] = {
    "threads.Thread": ("last_seq", "created_at", "updated_at"),
    "identity.APIKey": ("hashed_key", "created"),
    "identity.Profile": (),
    "auth.User": ("last_login",),
    "bank.Customer": (),
    "bank.Card": (),
    "bank.Transaction": (),
}
MASKED = {"auth.User": ["password"]}


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit trail"

    def ready(self) -> None:
        from auditlog import get_logentry_model
        from auditlog.registry import auditlog

        from audit.trail import stamp

        for label, left_out in TRACKED.items():
            model = apps.get_model(label)
            fields = [field.name for field in model._meta.concrete_fields if not field.primary_key]
            included = [name for name in fields if name not in left_out]
            auditlog.register(model, include_fields=included, mask_fields=list(MASKED.get(label, [])))
        pre_save.connect(stamp, sender=get_logentry_model(), dispatch_uid="audit.trail.stamp")
