"""A plain-text assistant: the registry serves text agents as well as structured ones."""

import uuid
from dataclasses import dataclass

from pydantic_ai import Agent

from agents.summary import EarlierSummary


@dataclass
class ChatDependencies:
    user_id: uuid.UUID


chat_agent = Agent(
    deps_type=ChatDependencies,
    output_type=str,
    name="general_chat",
    # The thread's summary of what left the history window, ahead of the exchanges replayed.
    capabilities=[EarlierSummary()],
    instructions="You are a friendly, concise assistant. Answer in plain text.",
)


def chat_deps(user_id: uuid.UUID) -> ChatDependencies:
    return ChatDependencies(user_id=user_id)
