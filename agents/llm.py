"""Which model answers, and what its failures mean to a client.

AGENT_MODEL names one model, or a chain of them separated by commas (`openai:gpt-4o,anthropic:claude-sonnet-4-5`):
a provider error before the first streamed event moves the request to the next model of the chain (pydantic-ai's
`FallbackModel`); when every model fails, the client gets `model_unavailable`.
"""

import logging
from collections.abc import Sequence
from functools import lru_cache

from django.conf import settings
from pydantic_ai import exceptions as ai
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models import Model, infer_model, parse_model_id
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.providers import infer_provider_class

from agents.demo import build_demo_model
from bankagent.exceptions import (
    ApplicationError,
    ModelError,
    ModelNotConfigured,
    ModelTimeout,
    ModelUnavailable,
    UsageLimitReached,
)

logger = logging.getLogger(__name__)

DEMO = "demo"


def model_names(setting: str) -> list[str]:
    """The models a textual AGENT_MODEL names, in the order they are tried."""
    return [name.strip() for name in setting.split(",")]


def model_name_problem(name: str, setting: str = "AGENT_MODEL") -> str | None:
    """Why `name` cannot name a model, without needing its credentials; None when it can."""
    if name == DEMO:
        return None
    provider, _ = parse_model_id(name)
    if provider is None:
        return f"{setting} {name!r} is not of the form 'provider:model' (or 'demo')."
    try:
        infer_provider_class(provider)
    except ValueError:
        return f"{setting} {name!r} names an unknown provider {provider!r}."
    return None


def model_setting_problems(setting: object, name: str = "AGENT_MODEL") -> list[str]:
    """Why a model setting cannot be used, one problem a model of its chain; none for the models tests put there."""
    if not isinstance(setting, str):
        return []
    return [problem for model in model_names(setting) if (problem := model_name_problem(model, name)) is not None]


class ModelChain(FallbackModel):
    """Models tried in turn, each known by its label as configured ("openai:gpt-4o"), not as its provider names it
    in a response ("gpt-4o-2024-08-06")."""

    def __init__(self, models: Sequence[Model], labels: Sequence[str]) -> None:
        super().__init__(*models)
        self.labels = list(labels)


@lru_cache(maxsize=8)
def _provider_model(name: str) -> Model:
    return infer_model(name)


@lru_cache(maxsize=8)
def _demo_model(delay_ms: int) -> Model:
    return build_demo_model(delay_ms=delay_ms)


@lru_cache(maxsize=8)
def _chain(names: tuple[str, ...], demo_delay_ms: int) -> ModelChain:
    return ModelChain([_named_model(name, demo_delay_ms) for name in names], names)


def _named_model(name: str, demo_delay_ms: int) -> Model:
    if name == DEMO:
        return _demo_model(demo_delay_ms)
    try:
        return _provider_model(name)
    except Exception as exc:  # each provider SDK raises its own type for a missing key
        # The provider's message names the missing variable, never its value; it stays in the log.
        logger.error("Model %r cannot be used: %s", name, exc)
        raise ModelNotConfigured() from exc


def agent_model() -> Model:
    """The model of AGENT_MODEL, resolved on every run so that settings (and tests) can swap it.

    AGENT_MODEL may also hold a `Model` instance, or a list of them (a chain): tests put `FunctionModel`s there.
    Every model of a chain must be usable (its provider's key set), as a single model must.
    """
    return _configured(settings.AGENT_MODEL)


def summary_model() -> Model:
    """The model that writes threads' summaries: AGENT_SUMMARY_MODEL, or the agents' own when it is empty."""
    return _configured(settings.AGENT_SUMMARY_MODEL) if settings.AGENT_SUMMARY_MODEL else agent_model()


def _configured(setting: str | Model | Sequence[Model]) -> Model:
    if isinstance(setting, Model):
        return setting
    if isinstance(setting, str):
        names = tuple(model_names(setting))
        delay_ms = settings.DEMO_MODEL_DELAY_MS
        return _named_model(names[0], delay_ms) if len(names) == 1 else _chain(names, delay_ms)
    return ModelChain(setting, [model.model_name for model in setting])


def model_label(model: Model) -> str:
    """What answers, as configured: "demo", "openai:gpt-4o", a chain "openai:gpt-4o,anthropic:claude-sonnet-4-5"..."""
    if isinstance(model, ModelChain):
        return ",".join(model.labels)
    return settings.AGENT_MODEL if isinstance(settings.AGENT_MODEL, str) else model.model_name


def answered_by(model: Model, response: ModelResponse | None) -> str:
    """The label of the model that wrote `response`, the run's last; for a chain, the one it fell back to."""
    if not isinstance(model, ModelChain) or response is None:
        return model_label(model)
    failed = response.failed_attempts or []
    answering = model.labels[min(len(failed), len(model.labels) - 1)]
    for attempt in failed:
        # The provider's text stays in the log.
        logger.warning("Model %s failed (%s); %s answered instead", attempt.model_name, attempt.error, answering)
    return answering


def model_failure(exc: BaseException) -> ApplicationError:
    """The client-facing error for an exception raised by a model run."""
    if isinstance(exc, ApplicationError):
        return exc
    if isinstance(exc, ai.FallbackExceptionGroup):
        failures = "; ".join(f"{type(error).__name__}: {error}" for error in exc.exceptions)
        logger.error("Every model of AGENT_MODEL failed: %s", failures)
        return ModelUnavailable()
    if isinstance(exc, ai.UsageLimitExceeded):
        logger.warning("A run reached its usage limit: %s", exc)
        return UsageLimitReached()
    if isinstance(exc, ai.ModelTimeoutError | ai.ModelRequestTimeout | ai.RunTimedOut | TimeoutError):
        return ModelTimeout()
    if isinstance(exc, ai.ModelAuthenticationError):
        logger.error("The model provider refused our credentials: %s", exc)
        return ModelNotConfigured()
    if isinstance(exc, ai.ModelUnavailableError | ai.ModelConnectionError | ai.ModelRateLimitError):
        return ModelUnavailable()
    if isinstance(exc, ai.ModelAPIError | ai.UnexpectedModelBehavior):
        return ModelError()
    logger.exception("Agent run failed", exc_info=exc)
    return ApplicationError()
