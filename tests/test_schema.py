"""The OpenAPI schema at /api/schema/ says what the service does: who may call what, the errors each operation can
answer, the constraints the serializers enforce, the stream's events and the links between operations."""

import json

import jsonschema_rs
import pytest
from django.conf import settings
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from agents.registry import agent_types

OPERATIONS = {
    "threads_list": ("get", "/api/v1/threads"),
    "threads_create": ("post", "/api/v1/threads"),
    "threads_retrieve": ("get", "/api/v1/threads/{id}"),
    "threads_update": ("patch", "/api/v1/threads/{id}"),
    "threads_delete": ("delete", "/api/v1/threads/{id}"),
    "threads_messages": ("get", "/api/v1/threads/{id}/messages"),
    "agents_list": ("get", "/api/v1/agents"),
    "agent_query": ("post", "/api/v1/agent/query"),
    "agent_stream": ("post", "/api/v1/agent/stream"),
    "run_events": ("get", "/api/v1/threads/{id}/runs/{message_id}/events"),
    "approval_decide": ("post", "/api/v1/threads/{id}/approvals/{approval_id}"),
    "thread_ui_stream": ("post", "/api/v1/threads/{id}/ui-stream"),
    "thread_ag_ui": ("post", "/api/v1/threads/{id}/ag-ui"),
    "ws_ticket_create": ("post", "/api/v1/ws-tickets"),
    "usage_retrieve": ("get", "/api/v1/usage"),
    "health": ("get", "/api/v1/health"),
}
CALL = {"400": {"bad_host", "invalid_user_id"}, "401": {"not_authenticated", "authentication_failed"}}
BODY = {
    "400": {"malformed_json", "invalid_body"},
    "413": {"payload_too_large"},
    "415": {"unsupported_media_type"},
    "422": {"validation_error"},
}
CSRF = {"403": {"csrf_failed"}}
RUN_START = {
    "400": {"invalid_text"},
    "404": {"not_found"},
    "409": {"thread_busy", "approval_pending"},
    "422": {"query_too_long"},
    "429": {"budget_exceeded"},
    "503": {"overloaded", "model_not_configured"},
}
EXPECTED_ERRORS = {
    "threads_list": [CALL, {"400": {"invalid_limit", "invalid_cursor"}, "422": {"unknown_agent_type"}}],
    "threads_create": [CALL, BODY, CSRF, {"400": {"invalid_text"}, "422": {"unknown_agent_type"}}],
    "threads_retrieve": [CALL, {"404": {"not_found"}}],
    "threads_update": [CALL, BODY, CSRF, {"400": {"invalid_text"}, "404": {"not_found"}}],
    "threads_delete": [CALL, CSRF, {"404": {"not_found"}}],
    "threads_messages": [CALL, {"400": {"invalid_limit", "invalid_cursor"}, "404": {"not_found"}}],
    "agents_list": [CALL],
    # A blocking query answers the model's failures too; a stream reports them as events.
    "agent_query": [
        CALL,
        BODY,
        CSRF,
        RUN_START,
        {"422": {"usage_limit_reached"}, "502": {"model_error"}, "504": {"model_timeout"}},
        {"503": {"model_unavailable", "run_interrupted"}},
    ],
    "agent_stream": [CALL, BODY, CSRF, RUN_START],
    "thread_ui_stream": [CALL, BODY, CSRF, RUN_START, {"409": {"approval_decided"}, "410": {"approval_expired"}}],
    "thread_ag_ui": [CALL, BODY, CSRF, RUN_START, {"409": {"approval_decided"}, "410": {"approval_expired"}}],
    "approval_decide": [
        CALL,
        BODY,
        CSRF,
        {"400": {"invalid_text"}, "404": {"not_found"}, "409": {"approval_decided"}, "410": {"approval_expired"}},
        {"422": {"usage_limit_reached"}, "429": {"budget_exceeded"}, "502": {"model_error"}, "504": {"model_timeout"}},
        {"503": {"overloaded", "model_not_configured", "model_unavailable", "run_interrupted"}},
    ],
    "run_events": [
        CALL,
        {"400": {"invalid_resume"}, "404": {"not_found"}, "410": {"resume_expired"}, "503": {"service_unavailable"}},
    ],
    "ws_ticket_create": [CALL, BODY, {"404": {"not_found"}, "503": {"service_unavailable"}}],
    "usage_retrieve": [CALL],
    "health": [{"400": {"bad_host"}}],
}
STREAM_EVENT_NAMES = {
    "message_created",
    "message_started",
    "text_delta",
    "token",
    "tool_call",
    "tool_result",
    "message_complete",
    "approval_required",
    "approval_decided",
    "error",
    "done",
}


@pytest.fixture(scope="module")
def schema() -> dict:
    response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def operations(schema) -> dict[str, dict]:
    found = {op["operationId"]: op for item in schema["paths"].values() for op in item.values()}
    assert set(found) == set(OPERATIONS)
    for operation_id, (method, path) in OPERATIONS.items():
        assert schema["paths"][path][method] is found[operation_id]
    return found


def component(schema: dict, ref: dict) -> dict:
    return schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]


def validator(schema: dict, ref: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for({"$ref": ref, "components": schema["components"]})


def parameter(operation: dict, name: str) -> dict:
    (found,) = [p for p in operation["parameters"] if p["name"] == name]
    return found


def error_codes(response: dict) -> set[str]:
    schema = response["content"]["application/json"]["schema"]
    base, refinement = schema["allOf"]
    assert base == {"$ref": "#/components/schemas/Error"}
    return set(refinement["properties"]["error"]["properties"]["code"]["enum"])


def test_the_schema_is_valid_openapi_3_1(schema):
    assert schema["openapi"] == "3.1.0"
    validate_schema(schema)


# Who may call what


def test_security_schemes_are_the_api_key_and_the_chat_pages_session(schema):
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKeyAuth"] | {"description": ""} == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "",
    }
    assert (schemes["sessionAuth"]["type"], schemes["sessionAuth"]["in"]) == ("apiKey", "cookie")
    assert (schemes["csrfToken"]["in"], schemes["csrfToken"]["name"]) == ("header", "X-CSRFToken")


@pytest.mark.parametrize("operation_id", sorted(set(OPERATIONS) - {"health"}))
def test_every_operation_but_health_needs_the_key_and_names_the_user(operations, operation_id):
    operation = operations[operation_id]
    method = OPERATIONS[operation_id][0]
    session = {"sessionAuth": []} if method == "get" else {"sessionAuth": [], "csrfToken": []}
    expected = [{"ApiKeyAuth": []}] if operation_id == "ws_ticket_create" else [{"ApiKeyAuth": []}, session]
    assert operation["security"] == expected
    user = parameter(operation, "X-User-ID")
    assert (user["in"], user["required"], user["schema"]) == ("header", True, {"type": "string", "format": "uuid"})


def test_health_needs_nothing(operations):
    assert "security" not in operations["health"]
    assert "parameters" not in operations["health"]


def test_the_schema_and_the_docs_are_not_operations(schema):
    assert not any(path.startswith(("/api/schema", "/api/docs")) for path in schema["paths"])


# Bodies


def test_request_bodies_are_json_only(schema, operations):
    assert "*/*" not in json.dumps(schema)
    with_body = {name for name, op in operations.items() if "requestBody" in op}
    assert with_body == {
        *("threads_create", "threads_update", "agent_query", "agent_stream", "ws_ticket_create", "approval_decide"),
        "thread_ui_stream",
        "thread_ag_ui",
    }
    for name in with_body:
        assert list(operations[name]["requestBody"]["content"]) == ["application/json"]


# Errors


@pytest.mark.parametrize("operation_id", sorted(EXPECTED_ERRORS))
def test_every_operation_documents_the_errors_it_can_answer(operations, operation_id):
    expected: dict[str, set[str]] = {}
    for group in EXPECTED_ERRORS[operation_id]:
        for status, codes in group.items():
            expected[status] = expected.get(status, set()) | codes
    if operation_id != "health":
        expected["429"] = expected.get("429", set()) | {"throttled"}
        expected["503"] = expected.get("503", set()) | {"database_busy"}
    responses = operations[operation_id]["responses"]
    errors = {status: response for status, response in responses.items() if status >= "400"}
    if operation_id == "health":
        errors.pop("503")  # the health answer itself, with the error object: see below

    assert {status: error_codes(response) for status, response in errors.items()} == expected
    for status, response in responses.items():
        if status >= "400":
            assert response["description"], status


def test_retry_after_and_www_authenticate_are_documented(operations):
    for operation in operations.values():
        responses = operation["responses"]
        if "429" in responses:
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
        if "503" in responses and operation["operationId"] != "health":
            assert "Retry-After" in responses["503"]["headers"]
            assert responses["503"]["headers"]["Retry-After"].get("required") is not True
        if "401" in responses:
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_health_answers_503_with_its_checks_and_the_error_object(schema, operations):
    down = {"status": "error", "database": "ok", "channel_layer": "error"}
    body = down | {"error": {"code": "service_unavailable", "message": "A service this server depends on is down."}}
    response_schema = operations["health"]["responses"]["503"]["content"]["application/json"]["schema"]

    assert jsonschema_rs.validator_for(response_schema | {"components": schema["components"]}).is_valid(body)
    assert not jsonschema_rs.validator_for(response_schema | {"components": schema["components"]}).is_valid(down)


# Constraints


@pytest.mark.parametrize("operation_id, default", [("threads_list", 20), ("threads_messages", 50)])
def test_pages_take_a_limit_of_1_to_100_and_an_opaque_cursor(operations, operation_id, default):
    operation = operations[operation_id]
    assert parameter(operation, "limit")["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": default,
    }
    assert parameter(operation, "cursor")["schema"] == {"type": "string", "minLength": 1}
    assert "Link" in operation["responses"]["200"]["headers"]


def test_the_agent_type_filter_lists_the_registry_and_the_empty_string(operations):
    assert parameter(operations["threads_list"], "agent_type")["schema"]["enum"] == ["", *agent_types()]


@pytest.mark.parametrize("operation_id", ["threads_retrieve", "threads_update", "threads_delete", "threads_messages"])
def test_path_ids_are_uuids(operations, operation_id):
    assert parameter(operations[operation_id], "id")["schema"] == {"type": "string", "format": "uuid"}


def test_thread_creation_constrains_agent_type_title_and_metadata(schema):
    fields = schema["components"]["schemas"]["ThreadCreate"]["properties"]
    assert component(schema, fields["agent_type"]["allOf"][0])["enum"] == agent_types()
    assert fields["title"]["type"] == ["string", "null"]
    assert fields["title"]["maxLength"] == 200
    assert fields["metadata"] == {"$ref": "#/components/schemas/JSONObject"}
    assert schema["components"]["schemas"]["ThreadCreate"]["required"] == ["agent_type"]


def test_query_is_1_to_max_query_chars_of_text_that_is_not_blank(schema):
    query = schema["components"]["schemas"]["AgentQuery"]["properties"]["query"]
    check = jsonschema_rs.validator_for(query)

    assert (query["minLength"], query["maxLength"]) == (1, settings.MAX_QUERY_CHARS)
    assert check.is_valid("What is my balance?")
    assert check.is_valid("  padded  ")
    for refused in ["", "   ", "\t\n\u3000", "nul\x00inside"]:
        assert not check.is_valid(refused), refused


def test_metadata_refuses_nul_in_strings_and_keys(schema):
    check = validator(schema, "#/components/schemas/JSONObject")

    assert check.is_valid({"order": {"items": [1, 2.5, True, None, "x"]}})
    assert not check.is_valid({"a": "nul\x00"})
    assert not check.is_valid({"nul\x00": 1})
    assert not check.is_valid({"deep": [{"a": "\x00"}]})
    assert not check.is_valid([])


def test_what_json_schema_cannot_say_is_said_in_words(schema):
    descriptions = json.dumps(schema)
    for words in ["unpaired surrogate", "64 bits", "64 levels", "65,536 bytes", "NaN and Infinity"]:
        assert words in descriptions, words


def test_answers_carry_their_statuses(schema):
    schemas = schema["components"]["schemas"]
    assert component(schema, schemas["AgentResponse"]["properties"]["status"]["allOf"][0])["enum"] == [
        "complete",
        "incomplete",
        "awaiting_approval",
    ]
    assert component(schema, schemas["Message"]["properties"]["status"]["allOf"][0])["enum"] == [
        "in_progress",
        "awaiting_approval",
        "complete",
        "incomplete",
        "failed",
    ]


# The stream


def test_the_stream_is_ndjson_of_one_schema_per_event(schema, operations):
    content = operations["agent_stream"]["responses"]["200"]["content"]
    assert list(content) == ["application/x-ndjson"]
    event = component(schema, content["application/x-ndjson"]["schema"])
    assert set(event["discriminator"]["mapping"]) == STREAM_EVENT_NAMES
    assert len(event["oneOf"]) == len(STREAM_EVENT_NAMES)
    complete = schema["components"]["schemas"]["MessageCompleteEvent"]
    assert set(complete["required"]) == {"event", "message_id", "seq", "status", "content", "output"}
    for ref in event["oneOf"]:
        assert "request_id" in component(schema, ref)["properties"]
        assert {"message_id", "seq"} <= set(component(schema, ref)["required"])


def test_stream_examples_are_valid_events(schema, operations):
    check = validator(schema, "#/components/schemas/StreamEvent")
    examples = operations["agent_stream"]["responses"]["200"]["content"]["application/x-ndjson"]["examples"]

    assert {example["value"]["event"] for example in examples.values()} >= STREAM_EVENT_NAMES - {"token"}
    for example in examples.values():
        check.validate(example["value"])
    assert not check.is_valid({"event": "text_delta", "message_id": "not-a-uuid"})
    assert not check.is_valid({"event": "no_such_event"})


def test_the_ui_stream_is_server_sent_events_of_ai_sdk_chunks_for_a_use_chat_request(schema, operations):
    operation = operations["thread_ui_stream"]
    content = operation["responses"]["200"]["content"]
    body = operation["requestBody"]
    example = body["content"]["application/json"]["examples"]["Balance"]["value"]

    assert list(content) == ["text/event-stream"]
    assert component(schema, content["text/event-stream"]["schema"])["required"] == ["data"]
    assert schema["components"]["schemas"]["UIMessageChunk"]["required"] == ["type"]
    assert body["required"] is True
    check = validator(schema, "#/components/schemas/UIMessageStreamRequest")
    check.validate(example)
    assert not check.is_valid({"id": "chat", "messages": [{"id": "m", "role": "tool", "parts": []}]})
    assert not check.is_valid({"id": "chat", "messages": [], "trigger": "submit-message"})


def test_the_ag_ui_endpoint_is_server_sent_events_of_ag_ui_events_for_a_run_agent_input(schema, operations):
    operation = operations["thread_ag_ui"]
    content = operation["responses"]["200"]["content"]
    body = operation["requestBody"]
    example = body["content"]["application/json"]["examples"]["Balance"]["value"]

    assert list(content) == ["text/event-stream"]
    assert component(schema, content["text/event-stream"]["schema"])["required"] == ["data"]
    assert schema["components"]["schemas"]["AGUIEvent"]["required"] == ["type"]
    assert body["required"] is True
    check = validator(schema, "#/components/schemas/RunAgentInput")
    check.validate(example)
    assert not check.is_valid({"threadId": "t", "runId": "r", "messages": [{"id": "m", "role": "robot"}]})
    assert not check.is_valid({"threadId": "t", "messages": []})


# Examples and links


def test_examples_are_the_bank_support_conversation_and_valid(schema, operations):
    query = operations["agent_query"]
    request = query["requestBody"]["content"]["application/json"]["examples"]["Balance"]["value"]
    answer = query["responses"]["200"]["content"]["application/json"]["examples"]["BalanceAnswered"]["value"]
    created = operations["threads_create"]["responses"]["201"]["content"]["application/json"]["examples"]

    assert request["query"] == "What is my balance?"
    assert "$1,123.45" in answer["output"]["support_advice"]
    validator(schema, "#/components/schemas/AgentQuery").validate(request)
    validator(schema, "#/components/schemas/AgentResponse").validate(answer)
    validator(schema, "#/components/schemas/Thread").validate(created["Created"]["value"])


def test_a_created_thread_links_to_every_operation_on_it(operations):
    links = operations["threads_create"]["responses"]["201"]["links"]

    targets = {link["operationId"] for link in links.values()}
    assert targets == {
        "threads_retrieve",
        "threads_update",
        "threads_delete",
        "threads_messages",
        "agent_query",
        "agent_stream",
        "thread_ui_stream",
        "thread_ag_ui",
        "ws_ticket_create",
    }
    for link in links.values():
        assert link["operationId"] in operations
        assert link["parameters"]["header.X-User-ID"] == "$request.header.X-User-ID"
        if "requestBody" in link:
            assert link["requestBody"] == {"thread_id": "$response.body#/id"}
        else:
            assert link["parameters"]["path.id"] == "$response.body#/id"
