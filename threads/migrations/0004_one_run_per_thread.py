"""One run per thread becomes the database's rule: a partial unique index on the thread's answer `in_progress`.

It replaces the plain index on the same rows. A database that already holds two answers in progress on one thread
(the rule was the application's until now, and concurrent requests could break it) keeps the latest: the earlier
ones are marked failed, `run_interrupted`, as the sweep marks a run whose process died.
"""

from django.db import migrations, models
from django.db.models import Count, Q

INTERRUPTED = {
    "code": "run_interrupted",
    "message": "The server stopped while this answer was being written; ask again.",
}


def interrupt_all_but_the_latest_run(apps, schema_editor):
    Message = apps.get_model("threads", "Message")
    db = schema_editor.connection.alias
    running = Message.objects.using(db).filter(status="in_progress")
    crowded = running.values("thread_id").annotate(runs=Count("pk")).filter(runs__gt=1).values_list("thread_id", flat=True)
    for thread_id in crowded:
        earlier = running.filter(thread_id=thread_id).order_by("-seq")[1:]
        for message in earlier.only("pk", "metadata"):
            Message.objects.using(db).filter(pk=message.pk).update(
                status="failed", lease_expires_at=None, metadata={**message.metadata, "error": INTERRUPTED}
            )


class Migration(migrations.Migration):
    dependencies = [
        ("threads", "0003_run_lease_on_message"),
    ]

    operations = [
        migrations.RunPython(interrupt_all_but_the_latest_run, migrations.RunPython.noop),
        migrations.RemoveIndex(model_name="message", name="message_run_lease"),
        migrations.AddConstraint(
            model_name="message",
            constraint=models.UniqueConstraint(
                condition=Q(("status", "in_progress")), fields=("thread",), name="message_one_run_per_thread"
            ),
        ),
    ]
