"""A thread's running summary, brought up to date in the background after each answer.

The model is shown a thread's last AGENT_HISTORY_TURNS exchanges, and ahead of them the thread's summary of those
before (`agents.summary`). Once an answer is saved and an exchange has left that window, the summary is brought up
to date in a task of its own: the model is given the summary so far and only the exchanges that left the window
since it was written, never the whole thread. Nothing waits for it, neither the answer nor the next question.

A summary that could not be written (the model failed, or took too long) is logged and the old one kept: the next
answer tries again. Two writers of a thread's summary at once (two processes, a slow writer and the next one) do not
both write: each writes only over the summary it started from, and the later finds it gone and drops its own.
"""

import asyncio
import contextvars
import logging
import uuid
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.db.models import F, Subquery
from django.utils import timezone

from agents.llm import model_failure, summary_model
from agents.summary import Exchange, summarise
from bankagent.db import db, serve_outside_requests
from bankagent.exceptions import ModelError
from threads.models import Message, Thread

logger = logging.getLogger(__name__)

SUMMARY_BATCH = 10
"""Exchanges folded in by one call of the model; a thread further behind (a long one before summaries existed, or
after failures) catches up a batch at a time."""
SUMMARY_STEPS = 5
"""Calls of the model one task makes at most, catching up."""
SUMMARY_TIMEOUT_SECONDS = 120
"""How long one call of the model may take before the summary is left as it was."""
SUMMARIES_AT_ONCE = 100
"""Summaries one process writes at once; past it an answer's is left to the thread's next answer."""

# Strong references, as for runs: a task held by nothing else could be collected before it ends.
_PENDING: set[asyncio.Task] = set()
_WRITING: dict[uuid.UUID, asyncio.Task] = {}
_AGAIN: set[uuid.UUID] = set()
"""Threads answered again while their summary was being written: the task writing it goes on with the newer."""


def summary_after_answer(*, thread_id: uuid.UUID, answer_seq: int) -> None:
    """Bring the thread's summary up to date in the background, once its saved answer `answer_seq` may have pushed an
    exchange out of the history window (it cannot have while the thread holds no more than the window's messages)."""
    if answer_seq <= 2 * settings.AGENT_HISTORY_TURNS:
        return
    writing = _WRITING.get(thread_id)
    if writing is not None and not writing.done() and writing.get_loop() is asyncio.get_running_loop():
        _AGAIN.add(thread_id)
        return
    if len(_PENDING) >= SUMMARIES_AT_ONCE:
        logger.info("Summary of thread %s left to its next answer: %d being written", thread_id, len(_PENDING))
        return
    # A context of its own: the task outlives the request, and must not do its database work on its thread.
    task = asyncio.create_task(_keep_up(thread_id), context=contextvars.Context())
    _WRITING[thread_id] = task
    _PENDING.add(task)
    task.add_done_callback(partial(_written, thread_id))


def _written(thread_id: uuid.UUID, task: asyncio.Task) -> None:
    _PENDING.discard(task)
    if _WRITING.get(thread_id) is task:
        del _WRITING[thread_id]
        _AGAIN.discard(thread_id)


async def settled() -> None:
    """Wait until every summary this process is writing (on this event loop) is written, or given up."""
    loop = asyncio.get_running_loop()
    while pending := {task for task in _PENDING if task.get_loop() is loop}:
        await asyncio.wait(pending)


async def _keep_up(thread_id: uuid.UUID) -> None:
    serve_outside_requests()
    for _ in range(SUMMARY_STEPS):
        _AGAIN.discard(thread_id)
        try:
            async with asyncio.timeout(SUMMARY_TIMEOUT_SECONDS):
                behind = await summary_update(thread_id)
        except Exception as exc:
            # model_failure logs, with its traceback, any failure that is not the model's.
            failure = model_failure(exc).code
            logger.warning("Summary of thread %s left as it was (%s); its next answer tries again", thread_id, failure)
            return
        if not behind and thread_id not in _AGAIN:
            return


async def summary_update(thread_id: uuid.UUID) -> bool:
    """Fold into the thread's summary the exchanges that left its history window since it was written (a batch of
    them); whether more are left to fold in."""
    due = await db(summary_due)(thread_id=thread_id, turns=settings.AGENT_HISTORY_TURNS, batch=SUMMARY_BATCH)
    if due is None:
        return False
    summary = await summarise(due.summary, due.exchanges, model=summary_model())
    if not summary:
        raise ModelError("The model wrote an empty summary.")
    saved = await db(summary_save)(
        thread_id=thread_id,
        after_seq=due.after_seq,
        upto_seq=due.upto_seq,
        summary=summary,
        exchanges=len(due.exchanges),
    )
    if not saved:
        logger.info("A newer summary of thread %s was written meanwhile; this one is dropped", thread_id)
    return saved and due.more


@dataclass(frozen=True)
class Due:
    """A thread's summary, and the exchanges to fold into it."""

    summary: str
    after_seq: int
    """The seq of the last message the summary covers."""
    upto_seq: int
    """The seq of the last message it will cover, with `exchanges`."""
    exchanges: list[Exchange]
    more: bool
    """Whether more than these have left the window: the next batch."""


def summary_due(*, thread_id: uuid.UUID, turns: int, batch: int) -> Due | None:
    """The thread's summary and the first `batch` exchanges, oldest first, that have left its window of the last
    `turns` since it was written (and whether more have); None when none has, or the thread is gone. An exchange
    counts as in the history window (`runs.selectors.thread_state`): a complete answer, with its question."""
    row = Thread.objects.filter(pk=thread_id).values_list("summary", "summary_upto_seq").first()
    if row is None:
        return None
    summary, after_seq = row
    answers = Message.objects.filter(
        thread_id=thread_id, role=Message.Role.ASSISTANT, status=Message.Status.COMPLETE, model_messages__isnull=False
    )
    left = answers.filter(seq__gt=after_seq)
    if turns:
        # Older than the oldest answer in the window; none while the window is not full (NULL).
        oldest_in_window = answers.order_by("-seq").values("seq")[turns - 1 : turns]
        left = left.filter(seq__lt=Subquery(oldest_in_window))
    answered = list(left.order_by("seq").values_list("seq", "content")[: batch + 1])
    if not answered:
        return None
    more = len(answered) > batch
    answered = answered[:batch]
    questions = dict(
        Message.objects.filter(thread_id=thread_id, seq__in=[seq - 1 for seq, _ in answered])
        .order_by()
        .values_list("seq", "content")
    )
    exchanges = [Exchange(questions.get(seq - 1, ""), content) for seq, content in answered]
    return Due(summary, after_seq, answered[-1][0], exchanges, more)


def summary_save(*, thread_id: uuid.UUID, after_seq: int, upto_seq: int, summary: str, exchanges: int) -> bool:
    """Write the summary over the one that covered the thread up to `after_seq`, now covering `exchanges` more, up to
    `upto_seq`. False when another was written meanwhile: this one, written from an older summary, is dropped."""
    return bool(
        Thread.objects.filter(pk=thread_id, summary_upto_seq=after_seq).update(
            summary=summary,
            summary_upto_seq=upto_seq,
            summary_exchanges=F("summary_exchanges") + exchanges,
            summary_updated_at=timezone.now(),
        )
    )
