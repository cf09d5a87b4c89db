"""Start-up checks: a misconfigured model or registry fails `manage.py check` and `migrate`."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from agents.llm import model_name_problem
from agents.registry import AGENTS


@register()
def check_agent_model(app_configs: Any, **kwargs: Any) -> list[Error]:
    problem = model_name_problem(settings.AGENT_MODEL)
    return [Error(problem, hint="Use 'demo' or a pydantic-ai model string.", id="agents.E001")] if problem else []


@register()
def check_summary_model(app_configs: Any, **kwargs: Any) -> list[Error]:
    name = settings.AGENT_SUMMARY_MODEL
    problem = model_name_problem(name, "AGENT_SUMMARY_MODEL") if isinstance(name, str) and name else None
    hint = "Use 'demo', a pydantic-ai model string, or nothing for AGENT_MODEL's."
    return [Error(problem, hint=hint, id="agents.E003")] if problem else []


@register()
def check_registry(app_configs: Any, **kwargs: Any) -> list[Error]:
    return [
        Error(f"Registry entry {key!r} describes agent_type {spec.agent_type!r}.", id="agents.E002")
        for key, spec in AGENTS.items()
        if key != spec.agent_type or spec.agent.name != key
    ]
