"""The run's reads."""

import uuid
from itertools import chain

from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter

from threads.models import Message


def thread_history(*, thread_id: uuid.UUID, turns: int) -> list[ModelMessage]:
    """The model's view of the last `turns` finished exchanges, tool calls included, in one query."""
    stored = (
        Message.objects.filter(
            thread_id=thread_id,
            role=Message.Role.ASSISTANT,
            status=Message.Status.COMPLETE,
            model_messages__isnull=False,
        )
        .order_by("-seq")
        .values_list("model_messages", flat=True)[:turns]
    )
    return ModelMessagesTypeAdapter.validate_python(list(chain.from_iterable(reversed(list(stored)))))
