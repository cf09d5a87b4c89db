"""The lease keeper (runs.keeper): renewals of every run of the process, on a thread and connection of their own."""

import asyncio
import threading
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.utils import timezone

import runs.keeper
from runs.hub import LocalRun
from runs.keeper import Kept, LeaseKeeper
from tests.conftest import begin_run
from threads.models import Message

TIMEOUT = 10

pytestmark = pytest.mark.django_db(transaction=True)


async def test_leases_are_renewed_while_the_thread_sockets_share_for_the_database_is_busy(make_thread, settings):
    settings.RUN_LEASE_SECONDS = 30
    thread = await sync_to_async(make_thread)()
    answer = (await sync_to_async(begin_run)(thread, lease_seconds=1)).assistant_message
    busy, done = threading.Event(), threading.Event()

    def handshake_that_takes_long() -> None:
        busy.set()
        done.wait(TIMEOUT)

    # What Channels runs before a socket's frames and at its handshake goes to this one thread.
    occupied = asyncio.ensure_future(sync_to_async(handshake_that_takes_long)())
    await asyncio.to_thread(busy.wait, TIMEOUT)
    keeper = LeaseKeeper()
    keeper.kept[answer.pk] = Kept(LocalRun(thread_id=thread.pk, received_at=0.0), None, renewed_at=float("-inf"))
    try:
        async with asyncio.timeout(TIMEOUT):
            await keeper.renew_due()
    finally:
        done.set()
        await occupied

    renewed = await Message.objects.aget(pk=answer.pk)
    assert renewed.lease_expires_at > timezone.now() + timedelta(seconds=20)


async def test_a_renewal_that_fails_closes_its_connection_and_the_next_one_renews(make_thread, monkeypatch):
    thread = await sync_to_async(make_thread)()
    answer = (await sync_to_async(begin_run)(thread, lease_seconds=1)).assistant_message
    keeper = LeaseKeeper()
    keeper.kept[answer.pk] = Kept(LocalRun(thread_id=thread.pk, received_at=0.0), None, renewed_at=float("-inf"))
    real = runs.keeper.runs_renew
    opened: list[bool] = []

    def drops_its_connection_once(**kwargs: object) -> set[uuid.UUID]:
        opened.append(connection.connection is not None)
        connection.ensure_connection()
        if len(opened) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real(**kwargs)

    monkeypatch.setattr(runs.keeper, "runs_renew", drops_its_connection_once)
    with pytest.raises(OperationalError):
        await keeper.renew_due()
    await keeper.renew_due()
    keeper.kept[answer.pk].renewed_at = float("-inf")  # due again
    await keeper.renew_due()

    # Closed after the failure, kept open after a renewal.
    assert opened[1:] == [False, True]
    assert (await Message.objects.aget(pk=answer.pk)).lease_expires_at > timezone.now()
