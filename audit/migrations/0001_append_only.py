"""On PostgreSQL the audit table refuses UPDATE and DELETE, whoever asks: records are only ever added.

The one change it lets through is a deleted login's records losing their link to it (the foreign key's ON DELETE SET
NULL); the records keep its name in `additional_data`. TRUNCATE, a table owner's maintenance (and how tests empty
tables), is not refused.
"""

from django.db import migrations

TABLE = "auditlog_logentry"

CREATE = [
    """
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND NEW.actor_id IS NULL AND to_jsonb(NEW) - 'actor_id' = to_jsonb(OLD) - 'actor_id' THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'audit records are append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    f"CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
    "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
]

DROP = [f"DROP TRIGGER IF EXISTS audit_append_only ON {TABLE}", "DROP FUNCTION IF EXISTS audit_append_only()"]


def on_postgresql(statements: list[str]):
    def run(apps, schema_editor) -> None:
        if schema_editor.connection.vendor == "postgresql":
            for statement in statements:
                schema_editor.execute(statement, params=None)  # no parameters: `%` is the message's placeholder

    return run


class Migration(migrations.Migration):
    dependencies = [("auditlog", "0017_add_actor_email")]

    operations = [migrations.RunPython(on_postgresql(CREATE), on_postgresql(DROP))]
