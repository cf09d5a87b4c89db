"""Start-up checks: a misconfigured model or registry fails `manage.py check` and `migrate`."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from agents.llm import model_setting_problems
from agents.registry import AGENTS


@register()
def check_agent_model(app_configs: Any, **kwargs: Any) -> list[Error]:
    hint = "Use 'demo' or a pydantic-ai model string, or several separated by commas (tried in turn)."
    return [Error(problem, hint=hint, id="agents.E001") for problem in model_setting_problems(settings.AGENT_MODEL)]


@register()
def check_summary_model(app_configs: Any, **kwargs: Any) -> list[Error]:
    setting = settings.AGENT_SUMMARY_MODEL
    problems = model_setting_problems(setting, "AGENT_SUMMARY_MODEL") if setting else []
    hint = "Use 'demo', a pydantic-ai model string (or several, tried in turn), or nothing for AGENT_MODEL's."
    return [Error(problem, hint=hint, id="agents.E003") for problem in problems]


@register()
def check_registry(app_configs: Any, **kwargs: Any) -> list[Error]:
    return [
        Error(f"Registry entry {key!r} describes agent_type {spec.agent_type!r}.", id="agents.E002")
        for key, spec in AGENTS.items()
        if key != spec.agent_type or spec.agent.name != key
    ]
