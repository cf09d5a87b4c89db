"""A thread's running summary, as the model writes it and as the agents are shown it.

The exchanges that leave a thread's history window are folded, a few at a time, into a summary kept on the thread
(see `runs.summaries`); each run shows it to the model ahead of the recent exchanges it replays.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelRequest, SystemPromptPart
from pydantic_ai.models import Model, ModelRequestContext

SUMMARY_PREFIX = "Summary of the earlier conversation: "
"""How the summary begins where the model reads it."""

SUMMARY_INSTRUCTIONS = (
    "You keep the running summary of a conversation between a user and an assistant. You are given the summary so "
    "far, in <summary>, and the exchanges that came after it, in <user> and <assistant>. Answer with the updated "
    "summary alone, in a few short sentences or bullet points, in the language of the conversation. Keep every fact "
    "the user gave about themselves (their name, where they live, amounts, dates, the cards and accounts they "
    "mentioned), what they asked for and what was decided or done; drop greetings and small talk."
)

summary_agent = Agent(output_type=str, name="summary", instructions=SUMMARY_INSTRUCTIONS)


@dataclass(frozen=True)
class Exchange:
    """A question and the answer saved for it."""

    question: str
    answer: str


def summary_prompt(previous: str, exchanges: Sequence[Exchange]) -> str:
    blocks = [f"<summary>\n{previous}\n</summary>"]
    for exchange in exchanges:
        blocks.append(f"<user>\n{exchange.question}\n</user>\n<assistant>\n{exchange.answer}\n</assistant>")
    return "\n".join(blocks)


async def summarise(previous: str, exchanges: Sequence[Exchange], *, model: Model) -> str:
    """The summary `previous` with `exchanges`, the ones that came after it, folded in."""
    result = await summary_agent.run(summary_prompt(previous, exchanges), model=model)
    return result.output.strip()


earlier_summary: ContextVar[str] = ContextVar("earlier_summary", default="")
"""The summary of the thread a run answers on, shown to the agents' model (see `summary_shown`)."""


@contextmanager
def summary_shown(summary: str) -> Iterator[None]:
    """Within the block (and the tasks it starts), the agents' model is shown `summary` (see `EarlierSummary`)."""
    token = earlier_summary.set(summary)
    try:
        yield
    finally:
        earlier_summary.reset(token)


class EarlierSummary(AbstractCapability[object]):
    """Shows the model the thread's summary ahead of the exchanges it replays.

    In each request only, never in the run's history (unlike pydantic-ai's `ProcessHistory`, which writes what it
    returns back into it): the messages an answer saves stay what was said, and the next run is shown the summary
    as it then stands.
    """

    async def before_model_request(
        self, ctx: RunContext[object], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        if summary := earlier_summary.get():
            told = ModelRequest(parts=[SystemPromptPart(SUMMARY_PREFIX + summary)])
            request_context.messages = [told, *request_context.messages]
        return request_context

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None
