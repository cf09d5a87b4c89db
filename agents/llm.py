"""Which model answers, and what its failures mean to a client."""

import logging
from functools import lru_cache

from django.conf import settings
from pydantic_ai import exceptions as ai
from pydantic_ai.models import Model, infer_model, parse_model_id
from pydantic_ai.providers import infer_provider_class

from agents.demo import build_demo_model
from bankagent.exceptions import (
    ApplicationError,
    ModelError,
    ModelNotConfigured,
    ModelTimeout,
    ModelUnavailable,
)

logger = logging.getLogger(__name__)

DEMO = "demo"


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


@lru_cache(maxsize=8)
def _provider_model(name: str) -> Model:
    return infer_model(name)


@lru_cache(maxsize=8)
def _demo_model(delay_ms: int) -> Model:
    return build_demo_model(delay_ms=delay_ms)


def agent_model() -> Model:
    """The model of AGENT_MODEL, resolved on every run so that settings (and tests) can swap it.

    AGENT_MODEL may also hold a `Model` instance: tests put a `FunctionModel` there.
    """
    return _model(settings.AGENT_MODEL)


def summary_model() -> Model:
    """The model that writes threads' summaries: AGENT_SUMMARY_MODEL, or the agents' own when it is empty."""
    return _model(settings.AGENT_SUMMARY_MODEL) if settings.AGENT_SUMMARY_MODEL else agent_model()


def _model(name: str | Model) -> Model:
    if isinstance(name, Model):
        return name
    if name == DEMO:
        return _demo_model(settings.DEMO_MODEL_DELAY_MS)
    try:
        return _provider_model(name)
    except Exception as exc:  # each provider SDK raises its own type for a missing key
        # The provider's message names the missing variable, never its value; it stays in the log.
        logger.error("Model %r cannot be used: %s", name, exc)
        raise ModelNotConfigured() from exc


def model_label(model: Model) -> str:
    """What answers, as configured: "demo", "openai:gpt-4o", ..."""
    return settings.AGENT_MODEL if isinstance(settings.AGENT_MODEL, str) else model.model_name


def model_failure(exc: BaseException) -> ApplicationError:
    """The client-facing error for an exception raised by a model run."""
    if isinstance(exc, ApplicationError):
        return exc
    if isinstance(exc, ai.ModelTimeoutError | ai.ModelRequestTimeout | ai.RunTimedOut | TimeoutError):
        return ModelTimeout()
    if isinstance(exc, ai.ModelAuthenticationError):
        logger.error("The model provider refused our credentials: %s", exc)
        return ModelNotConfigured()
    if isinstance(exc, ai.ModelUnavailableError | ai.ModelConnectionError | ai.ModelRateLimitError):
        return ModelUnavailable()
    if isinstance(exc, ai.ModelAPIError | ai.UnexpectedModelBehavior | ai.UsageLimitExceeded):
        return ModelError()
    logger.exception("Agent run failed", exc_info=exc)
    return ApplicationError()
