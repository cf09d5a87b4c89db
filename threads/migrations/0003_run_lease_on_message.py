"""The run lease moves from the thread to the answer being written: `in_progress` until `lease_expires_at`.

A thread whose lease was still held names its run's answer (its last message): that answer becomes
`in_progress` with the lease it had, and the next reader or sweep marks it interrupted if it lapsed.
"""

from datetime import timedelta

from django.conf import settings
from django.db import migrations, models
from django.db.models import Q


def lease_to_message(apps, schema_editor):
    Thread = apps.get_model("threads", "Thread")
    Message = apps.get_model("threads", "Message")
    db = schema_editor.connection.alias
    for thread in Thread.objects.using(db).exclude(run_token=None).only("pk", "last_seq", "run_heartbeat"):
        expires = thread.run_heartbeat + timedelta(seconds=settings.RUN_LEASE_SECONDS)
        answer = Message.objects.using(db).filter(thread_id=thread.pk, seq=thread.last_seq, role="assistant")
        answer.filter(status="incomplete").update(status="in_progress", lease_expires_at=expires)


def lease_to_thread(apps, schema_editor):
    Message = apps.get_model("threads", "Message")
    Thread = apps.get_model("threads", "Thread")
    db = schema_editor.connection.alias
    running = Message.objects.using(db).filter(status="in_progress")
    for message in running.only("pk", "thread_id", "lease_expires_at"):
        heartbeat = message.lease_expires_at - timedelta(seconds=settings.RUN_LEASE_SECONDS)
        Thread.objects.using(db).filter(pk=message.thread_id).update(run_token=message.pk, run_heartbeat=heartbeat)
    running.update(status="incomplete", lease_expires_at=None)


class Migration(migrations.Migration):
    dependencies = [
        ("threads", "0002_run_lease"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="lease_expires_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AlterField(
            model_name="message",
            name="status",
            field=models.CharField(
                choices=[
                    ("in_progress", "in progress"),
                    ("complete", "Complete"),
                    ("incomplete", "Incomplete"),
                    ("failed", "Failed"),
                ],
                default="complete",
                max_length=16,
            ),
        ),
        migrations.RunPython(lease_to_message, lease_to_thread),
        migrations.RemoveField(model_name="thread", name="run_heartbeat"),
        migrations.RemoveField(model_name="thread", name="run_token"),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=Q(("status", "in_progress")),
                fields=["thread", "lease_expires_at"],
                name="message_run_lease",
            ),
        ),
    ]
