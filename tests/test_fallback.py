"""AGENT_MODEL as a chain of models: a provider error before the first event moves the request to the next model,
the answer names the model that wrote it, and a chain whose every model fails is 503 `model_unavailable`, the
providers' words in the log only. A chain naming an unknown provider fails the start-up check."""

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agents.checks import check_agent_model
from agents.llm import ModelChain, agent_model, model_label
from bankagent.exceptions import ModelNotConfigured
from runs import runner
from tests.test_streaming_http import StreamClient, names
from threads.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

QUERY = "/api/v1/agent/query"
PROVIDER_TEXT = "provider said: overloaded, request sk-live-0123456789"
ANSWER = "Hello from the backup."


class Failing:
    """A model whose provider answers 503 before anything is streamed; it counts the requests it was sent."""

    def __init__(self, name: str) -> None:
        self.requests = 0
        self.model = FunctionModel(self._request, stream_function=self._stream, model_name=name)

    def _fail(self) -> ModelHTTPError:
        self.requests += 1
        return ModelHTTPError(status_code=503, model_name=self.model.model_name, body=PROVIDER_TEXT)

    def _request(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise self._fail()

    async def _stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        raise self._fail()
        yield ""  # an async generator: it fails when first iterated, as a stream that opened and then failed


def answering(name: str = "backup") -> FunctionModel:
    def request(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart(ANSWER)])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for word in ANSWER.split(" "):
            yield f"{word} "

    return FunctionModel(request, stream_function=stream, model_name=name)


@pytest.fixture
def chat_thread(transactional_db, user_id) -> Thread:
    return Thread.objects.create(user_id=user_id, agent_type="general_chat")


@pytest.fixture
async def runs_of_this_test(settings, transactional_db):
    """A channel layer of this test's event loop; every run started has ended before the test's flush."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)  # Channels drops its cached layers
    yield
    async with asyncio.timeout(20):
        while runner._RUNS:
            await asyncio.sleep(0.01)


def answer_of(thread: Thread) -> Message:
    return Message.objects.get(thread=thread, role=Message.Role.ASSISTANT)


# --- blocking --------------------------------------------------------------------------------------------------------


def test_a_blocking_query_falls_back_to_the_next_model_and_its_answer_names_it(client, chat_thread, settings, caplog):
    primary = Failing("primary")
    settings.AGENT_MODEL = [primary.model, answering("backup")]

    with caplog.at_level(logging.WARNING, logger="agents.llm"):
        response = client.post(QUERY, {"thread_id": str(chat_thread.pk), "query": "Hi"}, format="json")

    assert response.status_code == 200, response.content
    assert (response.json()["response"], response.json()["status"]) == (ANSWER, "complete")
    assert primary.requests == 1
    answer = answer_of(chat_thread)
    assert (answer.status, answer.content, answer.metadata["model"]) == ("complete", ANSWER, "backup")
    assert PROVIDER_TEXT not in json.dumps(answer.metadata)
    assert PROVIDER_TEXT in caplog.text  # the operator learns that the primary failed, and why


def test_a_blocking_query_whose_every_model_fails_is_503_model_unavailable_without_the_providers_words(
    client, chat_thread, settings, caplog
):
    first, second = Failing("first"), Failing("second")
    settings.AGENT_MODEL = [first.model, second.model]

    with caplog.at_level(logging.ERROR, logger="agents.llm"):
        response = client.post(QUERY, {"thread_id": str(chat_thread.pk), "query": "Hi"}, format="json")

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "model_unavailable"
    assert "provider said" not in response.content.decode() and "sk-live" not in response.content.decode()
    assert (first.requests, second.requests) == (1, 1)
    answer = answer_of(chat_thread)
    assert (answer.status, answer.metadata["error"]["code"]) == ("failed", "model_unavailable")
    assert PROVIDER_TEXT not in json.dumps(answer.metadata)
    assert PROVIDER_TEXT in caplog.text


def test_a_model_that_answers_first_is_the_only_one_asked(client, chat_thread, settings):
    backup = Failing("never asked")
    settings.AGENT_MODEL = [answering("primary"), backup.model]

    response = client.post(QUERY, {"thread_id": str(chat_thread.pk), "query": "Hi"}, format="json")

    assert response.status_code == 200, response.content
    assert backup.requests == 0
    assert answer_of(chat_thread).metadata["model"] == "primary"


# --- streamed ----------------------------------------------------------------------------------------------------


async def test_a_stream_falls_back_before_its_first_event_and_its_answer_names_the_model(
    runs_of_this_test, api_key, user_id, chat_thread, settings
):
    primary = Failing("primary")
    settings.AGENT_MODEL = [primary.model, answering("backup")]

    response = await StreamClient(api_key=api_key, user_id=user_id).post(chat_thread.pk, "Hi")

    events = response.events()
    assert response.status == 200
    assert names(events)[-2:] == ["message_complete", "done"]
    assert "error" not in names(events)
    assert events[-2]["content"].strip() == ANSWER
    assert primary.requests == 1
    answer = await Message.objects.aget(thread=chat_thread, role=Message.Role.ASSISTANT)
    assert (answer.status, answer.metadata["model"]) == ("complete", "backup")


async def test_a_stream_whose_every_model_fails_ends_with_model_unavailable_without_the_providers_words(
    runs_of_this_test, api_key, user_id, chat_thread, settings
):
    settings.AGENT_MODEL = [Failing("first").model, Failing("second").model]

    response = await StreamClient(api_key=api_key, user_id=user_id).post(chat_thread.pk, "Hi")

    events = response.events()
    assert names(events)[-2:] == ["error", "done"]
    assert events[-2]["error_type"] == "model_unavailable"
    assert "provider said" not in response.body.decode()
    answer = await Message.objects.aget(thread=chat_thread, role=Message.Role.ASSISTANT)
    assert (answer.status, answer.metadata["error"]["code"]) == ("failed", "model_unavailable")


# --- the setting -------------------------------------------------------------------------------------------------


def test_a_chain_of_model_strings_is_one_model_of_each_tried_in_turn(settings, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
    settings.AGENT_MODEL = "openai:gpt-4o, anthropic:claude-sonnet-4-5"

    model = agent_model()

    assert isinstance(model, ModelChain)
    assert [(inner.system, inner.model_name) for inner in model.models] == [
        ("openai", "gpt-4o"),
        ("anthropic", "claude-sonnet-4-5"),
    ]
    assert model_label(model) == "openai:gpt-4o,anthropic:claude-sonnet-4-5"


def test_a_chain_with_a_model_whose_key_is_missing_is_not_configured(settings, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    settings.AGENT_MODEL = "openai:gpt-4o,anthropic:claude-haiku-4-5"  # a model no other test has resolved

    with pytest.raises(ModelNotConfigured):
        agent_model()


def test_a_single_model_string_is_that_model_as_before(settings):
    settings.AGENT_MODEL = "demo"

    model = agent_model()

    assert not isinstance(model, ModelChain)
    assert model_label(model) == "demo"


@pytest.mark.parametrize(
    ("setting", "unknown"),
    [("nosuch:model", "nosuch"), ("openai:gpt-4o,nosuch:model", "nosuch"), ("demo,,openai:gpt-4o", None)],
    ids=["single", "in a chain", "empty entry"],
)
def test_a_model_of_the_setting_that_cannot_be_used_fails_the_start_up_check(settings, setting, unknown):
    settings.AGENT_MODEL = setting

    (error,) = check_agent_model(None)

    assert error.id == "agents.E001"
    if unknown:
        assert f"unknown provider {unknown!r}" in error.msg
    else:
        assert "not of the form" in error.msg
    with pytest.raises(SystemCheckError, match=r"agents\.E001"):
        call_command("check")


def test_a_chain_of_known_providers_passes_the_start_up_check(settings):
    settings.AGENT_MODEL = "openai:gpt-4o,anthropic:claude-sonnet-4-5,demo"

    assert check_agent_model(None) == []
