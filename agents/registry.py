"""The agents this service runs, by `agent_type`: an explicit table, no discovery."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from pydantic_ai import Agent

from agents.bank_support import OUTPUT_TOOL, support_agent, support_deps
from agents.general_chat import chat_agent, chat_deps
from bankagent.exceptions import UnknownAgentType
from bankagent.jsontypes import JSONObject


@dataclass(frozen=True)
class AgentSpec:
    agent_type: str
    description: str
    agent: Agent[object, object]
    deps_for: Callable[[uuid.UUID], object]
    """Builds the run's dependencies for an end user's id; it runs in the transaction that starts the run."""
    structured: bool
    """Whether the output is a JSON object (stored in `output`) rather than text."""
    output_tools: frozenset[str] = frozenset()
    """The tools the model answers through: not tools it used."""

    @cached_property
    def output_schema(self) -> JSONObject:
        """The schema of a saved answer's `output`: the first of the agent's output types (any other is a stop, such
        as the tool calls that wait for the customer's approval, never an answer)."""
        schema = self.agent.output_json_schema()
        return schema["anyOf"][0] if "anyOf" in schema else schema


AGENTS: dict[str, AgentSpec] = {
    spec.agent_type: spec
    for spec in [
        AgentSpec(
            agent_type="bank_support",
            description="The bank's support assistant: advice, card blocking and a risk level, from the "
            "customer's balance and recent transactions.",
            agent=support_agent,
            deps_for=support_deps,
            structured=True,
            output_tools=frozenset({OUTPUT_TOOL}),
        ),
        AgentSpec(
            agent_type="general_chat",
            description="A general assistant answering in plain text.",
            agent=chat_agent,
            deps_for=chat_deps,
            structured=False,
        ),
    ]
}


def agent_spec(agent_type: str) -> AgentSpec:
    try:
        return AGENTS[agent_type]
    except KeyError:
        raise UnknownAgentType.of(agent_type, agent_types()) from None


def agent_types() -> list[str]:
    return sorted(AGENTS)
