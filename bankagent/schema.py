"""The OpenAPI schema's shared parts: the error responses, text and JSON constraints the serializers enforce in
code, the stream's events, and a hook that adds what every operation shares (the X-User-ID header, Retry-After,
WWW-Authenticate) and the links that lead from a created thread to everything done with it.
"""

import json
from collections import defaultdict
from collections.abc import Iterable

from django.conf import settings
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import OpenApiExample, OpenApiResponse

from agents.registry import agent_types
from bankagent.exceptions import (
    ApplicationError,
    ApprovalDecided,
    ApprovalExpired,
    ApprovalPending,
    AuthenticationFailed,
    BadHost,
    BudgetExceeded,
    CsrfFailed,
    DatabaseBusy,
    InvalidText,
    InvalidUserId,
    MalformedJson,
    ModelError,
    ModelNotConfigured,
    ModelTimeout,
    ModelUnavailable,
    NotAnObject,
    NotAuthenticated,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueryTooLong,
    RunInterrupted,
    ServiceUnavailable,
    ThreadBusy,
    Throttled,
    UnsupportedMediaType,
    UsageLimitReached,
    ValidationFailed,
)
from identity.schema import API_KEY_SCHEME
from threads.serializers import QueryField

JSON_OBJECT_REF = {"$ref": "#/components/schemas/JSONObject"}

# Text is refused with 400 invalid_text when it holds NUL (a pattern says so) or an unpaired surrogate (which no
# JSON Schema pattern can express, and which no UTF-8 body can carry unescaped).
NO_NUL = "^[^\\u0000]*$"
# Python's str.isspace(), which DRF strips from both ends before checking a required text.
_SPACE = "\\t-\\r\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = f"^[^\\u0000]*[^\\u0000{_SPACE}][^\\u0000]*$"
TEXT_RULES = (
    "Surrounding whitespace is stripped, and lengths are counted in code points, after stripping. Text holding a "
    "NUL character or an unpaired surrogate (`\\ud800`) is refused with 400 `invalid_text`."
)
INT64 = 2**63

JSON_VALUE = {
    "description": "Any JSON value the parser reads: integers must fit in 64 bits, and the body may be nested at most "
    "64 levels deep (else 400 `malformed_json`).",
    "anyOf": [
        {"type": "string"},
        {"type": "integer", "minimum": -INT64, "maximum": INT64 - 1},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/JSONValue"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JSONValue"}},
    ],
}
METADATA_VALUE = {
    "description": "A JSON value as JSONValue, and its strings (keys too) free of NUL characters and unpaired "
    "surrogates (else 400 `invalid_text`).",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": "integer", "minimum": -INT64, "maximum": INT64 - 1},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/MetadataValue"}},
        JSON_OBJECT_REF,
    ],
}
JSON_OBJECT = {
    "type": "object",
    "description": "A JSON object, with MetadataValue's limits on everything in it.",
    "propertyNames": {"type": "string", "pattern": NO_NUL},
    "additionalProperties": {"$ref": "#/components/schemas/MetadataValue"},
}
IGNORED_FIELDS = {
    "$ref": "#/components/schemas/JSONValue",
    "description": "Fields not listed are ignored (still parsed: JSONValue's limits apply).",
}

ERROR = {
    "type": "object",
    "description": "Every error of the API, whatever its status.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "What went wrong, for machines."},
                "message": {"type": "string", "description": "What went wrong, for people."},
                "details": {
                    "type": "object",
                    "description": "More about it: the field errors of `validation_error`, the known agent types "
                    "of `unknown_agent_type`, the limit of `query_too_long`, the `limit`, `used` and `renews_at` "
                    "of `budget_exceeded`.",
                },
            },
        }
    },
}


def error_schema(codes: Iterable[str]) -> dict:
    """The error object, its code one of `codes`."""
    refinement = {"properties": {"error": {"properties": {"code": {"enum": sorted(set(codes))}}}}}
    return {"allOf": [{"$ref": "#/components/schemas/Error"}, refinement]}


def errors(*classes: type[ApplicationError]) -> dict[int, OpenApiResponse]:
    """The responses of these errors, grouped by status, each listing its codes: for `@extend_schema(responses=...)`."""
    by_status: dict[int, dict[str, str]] = defaultdict(dict)
    for cls in classes:
        by_status[cls.status_code][cls.default_code] = cls.default_detail.format(settings=settings)
    return {
        status: OpenApiResponse(
            response=error_schema(codes),
            description="\n".join(f"- `{code}`: {message}" for code, message in sorted(codes.items())),
        )
        for status, codes in sorted(by_status.items())
    }


class TextFieldExtension(OpenApiSerializerFieldExtension):
    """threads.serializers.TextField: what its checks refuse, as far as JSON Schema can say it."""

    target_class = "threads.serializers.TextField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        field = self.target
        schema = {"type": "string"}  # drf-spectacular adds null for allow_null, and maxLength for max_length
        if field.allow_blank:
            # Not a top-level pattern: drf-spectacular would add a oneOf branch for "", which the pattern matches too.
            schema["allOf"] = [{"pattern": NO_NUL}]
        else:
            schema |= {"minLength": 1, "pattern": NOT_BLANK}
        if isinstance(field, QueryField):
            schema["maxLength"] = settings.MAX_QUERY_CHARS
        schema["description"] = " ".join(filter(None, [field.help_text, TEXT_RULES]))
        return schema


class MetadataFieldExtension(OpenApiSerializerFieldExtension):
    target_class = "threads.serializers.MetadataField"

    def map_serializer_field(self, auto_schema, direction):
        return JSON_OBJECT_REF


class AgentTypeFieldExtension(OpenApiSerializerFieldExtension):
    target_class = "threads.serializers.AgentTypeField"
    priority = 1  # before TextFieldExtension, which matches it too

    def map_serializer_field(self, auto_schema, direction):
        return {
            "type": "string",
            "enum": agent_types(),
            "description": "An agent of `GET /api/v1/agents`; another answers 422 `unknown_agent_type`.",
        }


# The stream's events (HTTP NDJSON lines and websocket frames alike).
UUID = {"type": "string", "format": "uuid"}
REQUEST_ID = {"type": "string", "description": "The `request_id` of the websocket query frame that started the run."}
OUTPUT = {
    "type": ["object", "null"],
    "description": "The structured output (null for text agents, and for an answer stopped before it had one).",
}


SEQ = {
    "type": "integer",
    "minimum": 1,
    "description": "The event's place in its answer's events: 1, 2, 3 … (`after` of a resume). A delta that stands "
    "for several, merged for a reader that fell behind, carries the last one's.",
}
RUN_ID = {**UUID, "description": "The answer the run writes."}


def _event(name: str, description: str, required: dict | None = None, optional: dict | None = None) -> dict:
    required = {"message_id": RUN_ID, "seq": SEQ, **(required or {})}
    return {
        "type": "object",
        "description": description,
        "required": ["event", *required],
        "properties": {"event": {"type": "string", "enum": [name]}, **required, **(optional or {})}
        | {"request_id": REQUEST_ID},
    }


APPROVAL = {
    "type": "object",
    "description": "A tool call that waits for the customer's approval before it runs.",
    "required": ["id", "tool", "args", "expires_at"],
    "properties": {
        "id": UUID,
        "tool": {"type": "string"},
        "args": {"type": "object"},
        "expires_at": {"type": "string", "format": "date-time", "description": "Past it: 410 `approval_expired`."},
    },
}
DELTA = {
    "token": {
        "type": "string",
        "description": "Structured agents: the JSON text of the validated partial output so far, holding only the "
        "fields produced so far (cumulative). Text agents: the new text since the last delta.",
    },
}
EVENTS = {
    "MessageCreatedEvent": _event(
        "message_created",
        "The user's message, saved.",
        {
            "message": {
                "type": "object",
                "required": ["id", "role", "content"],
                "properties": {"id": UUID, "role": {"type": "string", "enum": ["user"]}, "content": {"type": "string"}},
            }
        },
    ),
    "MessageStartedEvent": _event("message_started", "The answer is being written."),
    "TextDeltaEvent": _event("text_delta", "The answer grew.", DELTA),
    "TokenEvent": _event("token", "`text_delta` as the legacy dialect (keys with `--events legacy`) names it.", DELTA),
    "ToolCallEvent": _event(
        "tool_call",
        "The agent looks something up (not sent in the legacy dialect).",
        {
            "tool_call": {
                "type": "object",
                "required": ["name", "args"],
                "properties": {"name": {"type": "string"}, "args": {"type": "object"}},
            },
        },
    ),
    "ToolResultEvent": _event(
        "tool_result",
        "What the lookup returned (not sent in the legacy dialect).",
        {
            "tool_result": {
                "type": "object",
                "required": ["name", "content"],
                "properties": {"name": {"type": "string"}, "content": {"description": "Any JSON value."}},
            },
        },
    ),
    "ApprovalRequiredEvent": _event(
        "approval_required",
        "The model called a tool that needs the customer's approval (blocking their card): the run stops; "
        "`message_complete` (status `awaiting_approval`) and `done` follow. Decide with `POST "
        "/api/v1/threads/{id}/approvals/{approval.id}` or the websocket frame `approval` (not sent in the legacy "
        "dialect).",
        {"approval": APPROVAL},
    ),
    "ApprovalDecidedEvent": _event(
        "approval_decided",
        "The answer goes on after the customer's decision (or its expiry): the first event of its continuation, "
        "whose `seq` goes on from the run that stopped (not sent in the legacy dialect).",
        {
            "approval": {
                "type": "object",
                "required": ["id", "tool", "status"],
                "properties": {
                    "id": UUID,
                    "tool": {"type": "string"},
                    "status": {"type": "string", "enum": ["approved", "denied", "expired"]},
                },
            }
        },
    ),
    "MessageCompleteEvent": _event(
        "message_complete",
        "The answer is saved: `complete`, `incomplete` when it was cancelled (what was written so far is kept), "
        "or `awaiting_approval` when it stopped for the customer's approval.",
        {
            "status": {"type": "string", "enum": ["complete", "incomplete", "awaiting_approval"]},
            "content": {"type": "string", "description": "As the message's `content`."},
            "output": OUTPUT,
        },
    ),
    "ErrorEvent": _event(
        "error",
        "The run failed (the answer is saved with status `failed`); `done` follows. The same code and message as "
        "the HTTP error would carry: `model_error`, `model_timeout`, `model_unavailable`, `model_not_configured`, "
        "`usage_limit_reached` (the answer keeps what it wrote), `run_interrupted`, `not_found` (the thread was "
        "deleted meanwhile), `internal_error`.",
        {"error": {"type": "string"}, "error_type": {"type": "string"}},
        {"details": {"type": "object"}},
    ),
    "DoneEvent": _event("done", "The last event of every run."),
}
STREAM_EVENT = {
    "description": "One line of the stream. In order: message_created, message_started, then text_delta, tool_call "
    "and tool_result as the answer is written, message_complete, done; on failure error then done; stopped for "
    "approval, approval_required before message_complete.",
    "oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in EVENTS],
    "discriminator": {
        "propertyName": "event",
        "mapping": {
            schema["properties"]["event"]["enum"][0]: f"#/components/schemas/{name}" for name, schema in EVENTS.items()
        },
    },
}
STREAM_EVENT_REF = {"$ref": "#/components/schemas/StreamEvent"}

COMPONENTS = {
    "Error": ERROR,
    "JSONValue": JSON_VALUE,
    "MetadataValue": METADATA_VALUE,
    "JSONObject": JSON_OBJECT,
    **EVENTS,
    "StreamEvent": STREAM_EVENT,
}

USER_ID_HEADER = {
    "name": "X-User-ID",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
    "description": "The end user the key holder acts for (any spelling Python's `uuid.UUID` reads names the same "
    "user). Missing or not a UUID: 400 `invalid_user_id`. Not needed with the chat page's session.",
}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "enum": ["X-API-Key"]}}}
RETRY_AFTER = {
    "schema": {"type": "integer", "minimum": 1},
    "description": "Seconds to wait before trying again.",
}
RETRYABLE = {cls.default_code for cls in (Overloaded, DatabaseBusy, ServiceUnavailable)}


def _error_codes(response: dict) -> set[str]:
    """The codes an error response built by `errors` lists."""
    try:
        refinement = response["content"]["application/json"]["schema"]["allOf"][1]
        return set(refinement["properties"]["error"]["properties"]["code"]["enum"])
    except (KeyError, IndexError):
        return set()


def _response_headers(status: str, response: dict) -> dict:
    if status == "401":
        return WWW_AUTHENTICATE
    if status == "429":
        return {"Retry-After": {**RETRY_AFTER, "required": True}}
    if status == "503" and (retryable := sorted(_error_codes(response) & RETRYABLE)):
        sent_with = " and ".join(f"`{code}`" for code in retryable)
        return {"Retry-After": {**RETRY_AFTER, "description": f"{RETRY_AFTER['description']} Sent with {sent_with}."}}
    return {}


def _thread_links() -> dict:
    """From a created thread to every operation on it, so that a client (or a fuzzer) can follow them."""
    same_user = {"header.X-User-ID": "$request.header.X-User-ID"}
    by_id = {"path.id": "$response.body#/id", **same_user}
    in_body = {"thread_id": "$response.body#/id"}
    links = {
        "RetrieveThread": ("threads_retrieve", by_id, None),
        "UpdateThread": ("threads_update", by_id, None),
        "DeleteThread": ("threads_delete", by_id, None),
        "ListMessages": ("threads_messages", by_id, None),
        "Query": ("agent_query", same_user, in_body),
        "Stream": ("agent_stream", same_user, in_body),
        "UIStream": ("thread_ui_stream", by_id, None),
        "AGUI": ("thread_ag_ui", by_id, None),
        "IssueWebsocketTicket": ("ws_ticket_create", same_user, in_body),
    }
    return {
        name: {"operationId": operation, "parameters": parameters} | ({"requestBody": body} if body else {})
        for name, (operation, parameters, body) in links.items()
    }


def complete_schema(result: dict, generator: object, request: object, public: bool) -> dict:
    """drf-spectacular postprocessing hook: shared components, per-operation headers, links."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(COMPONENTS)
    for path_item in result["paths"].values():
        for operation in path_item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schemas[media["schema"]["$ref"].rsplit("/", 1)[1]]["additionalProperties"] = IGNORED_FIELDS
            if any(API_KEY_SCHEME in requirement for requirement in operation.get("security", [])):
                operation["parameters"] = [USER_ID_HEADER, *operation.get("parameters", [])]
            responses = operation["responses"]
            for status, response in responses.items():
                if headers := _response_headers(status, response):
                    response["headers"] = {**response.get("headers", {}), **headers}
            operation["responses"] = dict(sorted(responses.items()))
            if operation["operationId"] == "threads_create":
                responses["201"]["links"] = _thread_links()
            if operation["operationId"] in ("thread_ui_stream", "thread_ag_ui"):
                operation["requestBody"]["required"] = True  # a raw schema's body is optional to drf-spectacular
    return result


# Who may answer what, by the errors' classes (their codes and statuses are the code's own).
CALL_ERRORS = (BadHost, InvalidUserId, NotAuthenticated, AuthenticationFailed, Throttled, DatabaseBusy)
"""Any call with credentials: the Host check, the key and user checks, the rate limit, a database that stays busy."""
BODY_ERRORS = (MalformedJson, NotAnObject, PayloadTooLarge, UnsupportedMediaType, ValidationFailed)
"""Any call with a JSON body."""
SESSION_WRITE_ERRORS = (CsrfFailed,)
"""An unsafe call of the chat page's session without its CSRF token."""
RUN_START_ERRORS = (
    *(InvalidText, NotFound, ThreadBusy, ApprovalPending, QueryTooLong),
    *(BudgetExceeded, Overloaded, ModelNotConfigured),
)
"""A run refused before anything is written."""
RUN_ERRORS = (*RUN_START_ERRORS, UsageLimitReached, ModelError, ModelUnavailable, ModelTimeout, RunInterrupted)
"""A blocking run: its failures are HTTP errors too (a streamed run's are `error` events)."""
DECISION_ERRORS = (
    *(InvalidText, NotFound, ApprovalDecided, ApprovalExpired, BudgetExceeded, Overloaded, ModelNotConfigured),
    *(UsageLimitReached, ModelError, ModelUnavailable, ModelTimeout, RunInterrupted),
)
"""A decision on an approval, and the answer going on after it as a blocking run."""


# Examples: the original service's bank support conversation with John, the demo customer.
_THREAD = {
    "id": "3008db24-c607-465b-b0bd-cd88b72892a7",
    "user_id": "123e4567-e89b-12d3-a456-426614174000",
    "agent_type": "bank_support",
    "title": "Card question",
    "metadata": {},
    "created_at": "2026-12-01T19:12:03.124865Z",
    "updated_at": "2026-12-01T19:12:03.124880Z",
}
_ASSISTANT_ID = "0a15d806-5dfd-446e-8711-b073c45521e5"
_BALANCE = {
    "support_advice": "John, your current balance is $1,123.45.",
    "block_card": False,
    "risk_level": 0,
    "follow_up_actions": ["Set up a low-balance alert"],
}
_BALANCE_TEXT = json.dumps(_BALANCE)
_QUERY = {"thread_id": _THREAD["id"], "query": "What is my balance?"}

THREAD_CREATE_EXAMPLES = [
    OpenApiExample("Bank support", {"agent_type": "bank_support", "title": "Card question"}, request_only=True),
    OpenApiExample("Created", _THREAD, response_only=True, status_codes=[201]),
]
AGENT_QUERY_EXAMPLES = [
    OpenApiExample("Balance", _QUERY, request_only=True),
    OpenApiExample(
        "Balance answered",
        {
            "thread_id": _THREAD["id"],
            "message_id": _ASSISTANT_ID,
            "user_message_id": "e86e973b-0083-4929-b208-84427c17b33e",
            "response": _BALANCE_TEXT,
            "output": _BALANCE,
            "status": "complete",
        },
        response_only=True,
    ),
]
AGENT_STREAM_EXAMPLES = [OpenApiExample("Balance", _QUERY, request_only=True)]
STREAM_EVENT_EXAMPLES = [
    OpenApiExample(name, {**value, "message_id": _ASSISTANT_ID, "seq": seq}, response_only=True)
    for seq, (name, value) in enumerate(
        [
            (
                "message_created",
                {
                    "event": "message_created",
                    "message": {
                        "id": "e86e973b-0083-4929-b208-84427c17b33e",
                        "role": "user",
                        "content": _QUERY["query"],
                    },
                },
            ),
            ("message_started", {"event": "message_started"}),
            (
                "tool_call",
                {"event": "tool_call", "tool_call": {"name": "customer_balance", "args": {"include_pending": False}}},
            ),
            ("tool_result", {"event": "tool_result", "tool_result": {"name": "customer_balance", "content": 1123.45}}),
            ("text_delta", {"event": "text_delta", "token": json.dumps({"support_advice": "John, your"})}),
            (
                "message_complete",
                {"event": "message_complete", "status": "complete", "content": _BALANCE_TEXT, "output": _BALANCE},
            ),
            (
                "error",
                {"event": "error", "error": ModelTimeout.default_detail, "error_type": ModelTimeout.default_code},
            ),
            ("done", {"event": "done"}),
            (
                "approval_required",
                {
                    "event": "approval_required",
                    "approval": {
                        "id": "5f0c2d36-8b5e-4a0e-9f3e-1d8a8f2c7b11",
                        "tool": "block_card",
                        "args": {},
                        "expires_at": "2026-01-01T12:15:00Z",
                    },
                },
            ),
            (
                "approval_decided",
                {
                    "event": "approval_decided",
                    "approval": {
                        "id": "5f0c2d36-8b5e-4a0e-9f3e-1d8a8f2c7b11",
                        "tool": "block_card",
                        "status": "approved",
                    },
                },
            ),
        ],
        start=1,
    )
]

# The AI SDK's UI message stream (`useChat`): its request, of which the service takes only the new question, and its
# chunks (pydantic-ai's models of them, pydantic_ai.ui.vercel_ai, say each one's fields).
UI_STREAM_SCHEMAS = {
    "UIMessageStreamRequest": {
        "type": "object",
        "description": "The AI SDK's `useChat` request. Only the new question is taken: the user messages after the "
        "last assistant message must be exactly one, of `text` parts only (joined by line breaks, then checked as a "
        "query's text is); else 400 `invalid_body`. The thread's saved history is what the model sees: earlier "
        "messages and system messages are ignored.",
        "required": ["id", "messages"],
        "properties": {
            "trigger": {"type": "string", "enum": ["submit-message"], "default": "submit-message"},
            "id": {"type": "string", "description": "The client's chat id; ignored."},
            "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/UIMessage"}},
        },
    },
    "UIMessage": {
        "type": "object",
        "description": "A message of the AI SDK's UI: a message of another shape answers 400 `invalid_body`.",
        "required": ["id", "role", "parts"],
        "properties": {
            "id": {"type": "string"},
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "metadata": {"$ref": "#/components/schemas/JSONValue"},
            "parts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "A part of the AI SDK's UIMessage: `text`, `reasoning`, `file`, `tool-*`, "
                    "`dynamic-tool`, `data-*`, `source-url`, `source-document` or `step-start`, with its fields.",
                    "required": ["type"],
                    "properties": {"type": {"type": "string"}},
                },
            },
        },
        "additionalProperties": False,
    },
    "UIMessageStreamEvent": {
        "type": "object",
        "description": "One event of the stream.",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "A UIMessageChunk as JSON; the last event's is `[DONE]`.",
            }
        },
    },
    "UIMessageChunk": {
        "type": "object",
        "description": "One chunk of the AI SDK's UI message stream: `start` (`messageId`: the answer's id), "
        "`text-start`, `text-delta`, `text-end`, `tool-input-available`, `tool-output-available`, "
        "`tool-approval-request` (`approvalId`: the approval to decide), `data-approval`, `data-output` (a "
        "structured answer's whole output), `error` (`errorText`: the contract's code, a colon, its message), "
        "`finish` (`finishReason`, `messageMetadata.status`: the saved answer's status).",
        "required": ["type"],
        "properties": {"type": {"type": "string"}},
    },
}
UI_STREAM_REQUEST_REF = {"$ref": "#/components/schemas/UIMessageStreamRequest"}
UI_STREAM_EVENT_REF = {"$ref": "#/components/schemas/UIMessageStreamEvent"}
UI_STREAM_EXAMPLES = [
    OpenApiExample(
        "Balance",
        {
            "trigger": "submit-message",
            "id": "chat-1",
            "messages": [{"id": "m-1", "role": "user", "parts": [{"type": "text", "text": _QUERY["query"]}]}],
        },
        request_only=True,
    )
]
COMPONENTS.update(UI_STREAM_SCHEMAS)

# The AG-UI protocol: its RunAgentInput, of which the service takes only the new question, and its events (the
# ag-ui-protocol package's models, ag_ui.core, say each one's fields). Every field the package's model reads is
# listed, as loosely as the model reads it, so that what the schema allows the model allows too.
_ANY = {"$ref": "#/components/schemas/JSONValue"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_METADATA = {"type": ["object", "null"], "additionalProperties": _ANY}
AG_UI_SCHEMAS = {
    "RunAgentInput": {
        "type": "object",
        "description": "AG-UI's RunAgentInput. Only the new question is taken: the user messages after the last "
        "assistant message must be exactly one, of text (a string, or `text` parts joined by line breaks, then "
        "checked as a query's text is); else 400 `invalid_body`. The thread's saved history is what the model "
        "sees: the client's `threadId`, `runId`, earlier messages, system messages, `tools`, `context`, `state` and "
        "`forwardedProps` are ignored (the thread is the URL's, the run id the answer's). With `resume`, the input "
        "is a decision on an approval instead.",
        "required": ["threadId", "runId", "messages"],
        "properties": {
            "threadId": {"type": "string"},
            "runId": {"type": "string"},
            "protocolVersion": _NULLABLE_STRING,
            "parentRunId": _NULLABLE_STRING,
            "state": _ANY,
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/AGUIMessage"}},
            "tools": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "required": ["name", "description"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "parameters": _ANY,
                        "metadata": _METADATA,
                    },
                    "additionalProperties": _ANY,
                },
            },
            "context": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "required": ["description", "value"],
                    "properties": {"description": {"type": "string"}, "value": {"type": "string"}},
                    "additionalProperties": _ANY,
                },
            },
            "forwardedProps": _ANY,
            "resume": {
                "type": ["array", "null"],
                "description": "The customer's decision on the approval an answer's interrupt asked for: one entry, "
                "`resolved` with `{approved, note?}`, or `cancelled` (denied). Present and not empty, the input is "
                "that decision, and its messages are ignored.",
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["interruptId", "status"],
                    "properties": {
                        "interruptId": {"type": "string", "format": "uuid", "description": "The approval's id."},
                        "status": {"type": "string", "enum": ["resolved", "cancelled"]},
                        "payload": _ANY,
                        "metadata": _METADATA,
                    },
                    "oneOf": [
                        {
                            "properties": {
                                "status": {"const": "resolved"},
                                "payload": {
                                    "type": "object",
                                    "required": ["approved"],
                                    "properties": {"approved": {"type": "boolean"}, "note": {"type": "string"}},
                                    "additionalProperties": _ANY,
                                },
                            },
                            "required": ["payload"],
                        },
                        {"properties": {"status": {"const": "cancelled"}}},
                    ],
                    "additionalProperties": _ANY,
                },
            },
        },
    },
    "AGUIMessage": {
        "type": "object",
        "description": "A message of AG-UI (`developer`, `system`, `assistant`, `user`, `tool`, `activity`, "
        "`reasoning`), with its role's fields: one of another shape answers 400 `invalid_body`. The new user "
        "message's `content` is a string, or `text` parts only.",
        "required": ["id", "role"],
        "properties": {
            "id": {"type": "string"},
            "role": {
                "type": "string",
                "enum": ["developer", "system", "assistant", "user", "tool", "activity", "reasoning"],
            },
        },
        "additionalProperties": _ANY,
    },
    "AGUIStreamEvent": {
        "type": "object",
        "description": "One event of the stream.",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": "An AGUIEvent as JSON."}},
    },
    "AGUIEvent": {
        "type": "object",
        "description": "One AG-UI event: `RUN_STARTED` (`threadId`: the thread's id, `runId`: the answer's id), "
        "`TEXT_MESSAGE_START`, `TEXT_MESSAGE_CONTENT`, `TEXT_MESSAGE_END` (the answer's first text message has the "
        "answer's id), `TOOL_CALL_START`, `TOOL_CALL_ARGS`, `TOOL_CALL_END`, `TOOL_CALL_RESULT` (`content`: the "
        "tool's return value as JSON text), `CUSTOM` named `output` (a structured answer's whole output), "
        "`RUN_ERROR` (`code`: the contract's code) or `RUN_FINISHED` (`outcome`: `success`, `cancelled`, or "
        "`interrupt` with one interrupt per approval the answer waits for: `id` the approval to decide, `reason` "
        "`tool_approval`, `toolCallId`, `expiresAt`, `metadata.approval` the contract's approval).",
        "required": ["type"],
        "properties": {"type": {"type": "string"}},
    },
}
AG_UI_REQUEST_REF = {"$ref": "#/components/schemas/RunAgentInput"}
AG_UI_EVENT_REF = {"$ref": "#/components/schemas/AGUIStreamEvent"}
AG_UI_EXAMPLES = [
    OpenApiExample(
        "Balance",
        {
            "threadId": _THREAD["id"],
            "runId": "run-1",
            "messages": [{"id": "m-1", "role": "user", "content": _QUERY["query"]}],
        },
        request_only=True,
    )
]
COMPONENTS.update(AG_UI_SCHEMAS)
