import json

import pytest
from asgiref.sync import async_to_sync
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agents.runner import run_query
from bankagent.exceptions import ModelError, ModelNotConfigured
from threads.models import Message
from threads.selectors import thread_history

ADVICE = {"support_advice": "Your balance is $1,123.45.", "block_card": False, "risk_level": 1, "follow_up_actions": []}


def balance_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First call the balance tool, then answer with what it returned."""
    last = messages[-1]
    returns = [p for p in last.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("customer_balance", {"include_pending": True})])
    advice = {**ADVICE, "support_advice": f"Your balance is {returns[0].content}."}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, advice)])


def run(thread, query):
    return async_to_sync(run_query)(thread=thread, query=query)


@pytest.fixture
def use_model(settings):
    def use(function) -> FunctionModel:
        settings.AGENT_MODEL = FunctionModel(function)
        return settings.AGENT_MODEL

    return use


def test_tool_call_then_structured_output_is_saved(make_thread, use_model):
    use_model(balance_then_answer)
    thread = make_thread()

    turn = run(thread, "What is my balance?")

    answer = Message.objects.get(pk=turn.assistant_message.pk)
    # John's balance plus his pending card payment, read from the database by the real tool.
    assert answer.output["support_advice"] == "Your balance is 1118.95."
    assert json.loads(answer.content) == answer.output
    assert answer.status == Message.Status.COMPLETE
    assert answer.metadata["usage"]["requests"] == 2
    assert answer.metadata["usage"]["tool_calls"] == 1
    assert answer.metadata["model"] == "function:balance_then_answer:"
    assert answer.metadata["duration_ms"] >= 0
    kinds = [part["part_kind"] for message in answer.model_messages for part in message["parts"]]
    assert kinds[:1] == ["user-prompt"]
    assert "tool-call" in kinds and "tool-return" in kinds


def test_history_replays_tool_calls_across_turns(make_thread, use_model):
    seen: list[list[ModelMessage]] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(messages)
        return balance_then_answer(messages, info)

    use_model(recording)
    thread = make_thread()
    run(thread, "What is my balance?")
    run(thread, "And now?")

    second_turn_first_request = seen[2]
    prompts = [p.content for m in second_turn_first_request for p in m.parts if isinstance(p, UserPromptPart)]
    assert prompts == ["What is my balance?", "And now?"]
    calls = [p for m in second_turn_first_request for p in m.parts if isinstance(p, ToolCallPart)]
    returns = [p for m in second_turn_first_request for p in m.parts if isinstance(p, ToolReturnPart)]
    assert calls[0].tool_name == "customer_balance" and calls[0].args_as_dict() == {"include_pending": True}
    assert returns[0].tool_name == "customer_balance" and returns[0].content == 1118.95
    assert returns[0].tool_call_id == calls[0].tool_call_id


def test_history_window_keeps_the_latest_turns(make_thread, use_model, settings):
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("ok")]))
    thread = make_thread(agent_type="general_chat")
    for number in range(4):
        run(thread, f"question {number}")

    history = thread_history(thread=thread, turns=2)

    prompts = [p.content for m in history for p in m.parts if isinstance(p, UserPromptPart)]
    assert prompts == ["question 2", "question 3"]


def test_text_agent_stores_text_and_no_output(make_thread, use_model):
    use_model(lambda messages, info: ModelResponse(parts=[TextPart("Hello there")]))
    turn = run(make_thread(agent_type="general_chat"), "Hi")
    answer = Message.objects.get(pk=turn.assistant_message.pk)
    assert (answer.content, answer.output, answer.status) == ("Hello there", None, "complete")


def test_model_error_keeps_the_question_and_records_a_failed_answer(make_thread, use_model):
    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(status_code=500, model_name="broken", body="provider exploded")

    use_model(broken)
    thread = make_thread()

    with pytest.raises(ModelError):
        run(thread, "What is my balance?")

    question, answer = Message.objects.filter(thread=thread).order_by("seq")
    assert (question.role, question.content, question.status) == ("user", "What is my balance?", "complete")
    assert (answer.role, answer.status, answer.model_messages) == ("assistant", "failed", None)
    assert answer.metadata["error"]["code"] == "model_error"
    assert "provider exploded" not in json.dumps(answer.metadata)
    assert thread_history(thread=thread, turns=10) == []


def test_missing_provider_key_is_503_and_writes_nothing(make_thread, settings, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings.AGENT_MODEL = "openai:gpt-4o"
    thread = make_thread()

    with pytest.raises(ModelNotConfigured) as raised:
        run(thread, "Hello")

    assert raised.value.status == 503
    assert not Message.objects.filter(thread=thread).exists()


def test_request_to_a_real_provider_is_refused_in_tests(make_thread, settings, monkeypatch):
    """ALLOW_MODEL_REQUESTS is off: a test can never reach a paid provider by accident."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    settings.AGENT_MODEL = "openai:gpt-4o-mini"
    thread = make_thread()

    with pytest.raises(Exception) as raised:
        run(thread, "Hello")

    assert raised.value.status == 500
    assert "sk-test" not in str(raised.value)
    assert Message.objects.get(thread=thread, role="assistant").status == "failed"


def test_first_request_of_a_turn_carries_the_customer_name(make_thread, use_model):
    seen: list[AgentInfo] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(info)
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, ADVICE)])

    use_model(recording)
    run(make_thread(), "Hello")
    assert "The customer's name is 'John'" in seen[0].instructions
