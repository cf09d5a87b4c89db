"""bankagent settings: everything that differs between machines comes from the environment."""

import ipaddress
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()


def _number(name: str, default: float, *, minimum: float) -> float:
    """A numeric setting read strictly: a malformed or out-of-range value names itself at start-up instead of
    being half-parsed (`1e3` read as 13) or failing later."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise ImproperlyConfigured(f"{name} must be a number of at least {minimum:g}, not {raw!r}.")
    return value


def _whole(name: str, default: int, *, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ImproperlyConfigured(f"{name} must be a whole number of at least {minimum}, not {raw!r}.")
    return int(raw)


_ON, _OFF = {"on", "true", "yes", "y", "ok", "1"}, {"off", "false", "no", "n", "0"}


def _flag(name: str, default: bool) -> bool:
    """An on/off setting read strictly: a value that is neither names itself at start-up instead of reading as off
    (django-environ's `bool` takes anything it does not know for false)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _ON | _OFF:
        return raw.lower() in _ON
    raise ImproperlyConfigured(f"{name} must be on or off, not {raw!r}.")


DEBUG = _flag("DJANGO_DEBUG", default=False)

# DEBUG is the development mode of `make run`; anywhere else a missing key is a deployment mistake.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it to a long random string, "
            "or set DJANGO_DEBUG=on for local development."
        )
    SECRET_KEY = "insecure-development-key-never-use-in-production"

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_api_key",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "bankagent",
    "identity",
    "bank",
    "threads",
    "agents",
    "runs",
    "chat",
    "auditlog",
    "audit",
]

# Django's middleware, in variants that run on the event loop (see bankagent.middleware), and servestatic's
# (whitenoise's fork that serves static files without leaving the event loop).
MIDDLEWARE = [
    "bankagent.middleware.HostValidationMiddleware",
    "bankagent.middleware.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "bankagent.middleware.BodySizeLimitMiddleware",
    "bankagent.middleware.SessionMiddleware",
    "bankagent.middleware.CommonMiddleware",
    "bankagent.middleware.CsrfViewMiddleware",
    "bankagent.middleware.AuthenticationMiddleware",
    "bankagent.middleware.MessageMiddleware",
    "bankagent.middleware.XFrameOptionsMiddleware",
    "audit.middleware.AuditRequestMiddleware",
]

ROOT_URLCONF = "bankagent.urls"
ASGI_APPLICATION = "bankagent.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
# Threads for database work outside requests (runs in the background, websockets): one a pooled connection.
DATABASE_THREADS = _whole("DATABASE_POOL_MAX", 20, minimum=1)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process: connections are reused across requests and worker threads, and (health checks on)
    # each is checked before it is handed out, so one PostgreSQL dropped is replaced rather than given out.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"].get("OPTIONS", {}),
        "pool": {
            "min_size": _whole("DATABASE_POOL_MIN", 2, minimum=0),
            "max_size": DATABASE_THREADS,
            "timeout": _number("DATABASE_POOL_TIMEOUT", 10, minimum=0.1),
        },
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Concurrent writers wait their turn: WAL lets readers go on beside the writer, IMMEDIATE takes the write
    # lock when a transaction begins (a read lock upgraded later would fail at once rather than wait), and the
    # busy timeout is how long a writer waits before the request answers 503 database_busy.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": _number("SQLITE_BUSY_TIMEOUT", 20, minimum=0),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
    }
    # Tests get a database file, not Django's shared in-memory one: it locks as production's file does (writers
    # wait their turn) instead of failing a write that overlaps a read.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"bankagent-test-{os.getpid()}.sqlite3")}

REDIS_URL = env.str("REDIS_URL", default="")
# Every connection to Redis, pub/sub included, gives up on connecting after 1 s and on an answer after 2 s: a Redis
# that is down, or accepts connections and never answers, fails calls instead of holding them. (A subscriber's wait
# for messages has a timeout of its own and is not cut short.)
REDIS_TIMEOUTS = {"socket_connect_timeout": 1, "socket_timeout": 2}
if REDIS_URL:
    # Redis pub/sub carries a run's events and cancels between processes: one PUBLISH a batch, no queues to expire
    # or overflow. Each process subscribes once for all its sockets (runs.hub), so nothing waits in Redis.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, **REDIS_TIMEOUTS}]},
        }
    }
    # While the cache is down, throttles count per process and ticket requests answer 503.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": REDIS_TIMEOUTS,
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
# Development serves static files straight from the apps; deployments run collectstatic, which gives every file a
# content-hashed name (cached for ever by browsers) and a compressed copy.
SERVESTATIC_USE_FINDERS = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "servestatic.storage.CompressedManifestStaticFilesStorage"
    },
}

# The audit trail (README, "Audit trail"; the models it records: audit.apps): auditlog's table, with the request id as
# each record's correlation id and the changes as JSON.
AUDITLOG_MASK_CALLABLE = "audit.trail.hidden"
AUDITLOG_STORE_JSON_CHANGES = True
AUDITLOG_CID_GETTER = "audit.trail.request_id"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"

# The contract's limits, defined once. A body: 65,536 bytes accepted, one more refused (bankagent.middleware);
# a websocket frame over it gets `payload_too_large` and the socket stays open, up to the hard limit, above which
# the server closes with 1009 before reading it whole. A query: 8,000 code points after stripping.
MAX_BODY_BYTES = 65_536
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_BODY_BYTES
WS_MAX_FRAME_BYTES = 1_048_576
MAX_QUERY_CHARS = 8_000

# The API uses no trailing slashes; a redirect would turn a POST into a GET.
APPEND_SLASH = False

SESSION_COOKIE_SECURE = _flag("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# https, for a deployment behind a proxy that terminates TLS; all off by default, so that `make run` and anything else
# on plain http keep working. The proxy must set X-Forwarded-Proto itself, replacing what a client sent: trusted, the
# header makes a request secure (no redirect, HSTS, the CSRF check of an https Origin).
_FORWARDED_HTTPS = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_PROXY_SSL_HEADER = _FORWARDED_HTTPS if _flag("DJANGO_SECURE_PROXY_SSL_HEADER", False) else None
SECURE_SSL_REDIRECT = _flag("DJANGO_SSL_REDIRECT", False)
# Health probes often reach the process straight over http, past the proxy, and take a redirect for a failure.
SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]
SECURE_HSTS_SECONDS = _whole("DJANGO_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _flag("DJANGO_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _flag("DJANGO_HSTS_PRELOAD", False)
# Django's checks of the security, CSRF and clickjacking middleware look for them by their own dotted names and do
# not find bankagent.middleware's subclasses; bankagent.checks runs them as if they did (and reports, under its own
# ids, any of the three really missing).
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

# Agents
AGENT_MODEL = env.str("AGENT_MODEL", default="demo")
DEMO_MODEL_DELAY_MS = _whole("DEMO_MODEL_DELAY_MS", 25, minimum=0)
# How many earlier exchanges of a thread the model sees.
AGENT_HISTORY_TURNS = _whole("AGENT_HISTORY_TURNS", 20, minimum=0)
# The model that folds the exchanges leaving that window into the thread's summary (empty: AGENT_MODEL's).
AGENT_SUMMARY_MODEL = env.str("AGENT_SUMMARY_MODEL", default="")
# A run holds its thread for this long past its last renewal (it renews every third of it); a run whose process
# died is marked interrupted once it lapses. A streamed answer is checkpointed this often while it grows.
RUN_LEASE_SECONDS = _number("RUN_LEASE_SECONDS", 30, minimum=1)
RUN_CHECKPOINT_SECONDS = _number("RUN_CHECKPOINT_SECONDS", 2, minimum=0.1)
# A run's events are kept this long after it ends, for clients that resume it (in Redis with REDIS_URL).
RUN_EVENTS_TTL_SECONDS = _number("RUN_EVENTS_TTL_SECONDS", 300, minimum=1)
# How long the customer has to approve or deny a tool call an answer waits for (blocking their card).
APPROVAL_TTL_SECONDS = _number("APPROVAL_TTL_SECONDS", 900, minimum=1)
# Runs one process serves at once; past it a new run is refused with 503 `overloaded`. Of those, how many models
# answer at once: the others wait their turn, accepted and saved.
RUN_CONCURRENCY = _whole("RUN_CONCURRENCY", 1000, minimum=1)
RUN_MODEL_CONCURRENCY = _whole("RUN_MODEL_CONCURRENCY", 100, minimum=1)
# Streamed chunks arriving within this window are validated once, as one delta (0: validate every chunk).
STREAM_DEBOUNCE_MS = _number("STREAM_DEBOUNCE_MS", 10, minimum=0)
# Events a reader may fall behind by (deltas merge while they wait) before it is dropped.
STREAM_BACKLOG_EVENTS = _whole("STREAM_BACKLOG_EVENTS", 500, minimum=1)
WS_TICKET_SECONDS = 60
# A revoked key keeps working for at most this long in a process that verified it lately.
API_KEY_CACHE_SECONDS = _number("API_KEY_CACHE_SECONDS", 5, minimum=0)


# Spending. A run stops with `usage_limit_reached` past AGENT_MAX_REQUESTS model requests (pydantic-ai's own default,
# 50), AGENT_MAX_TOOL_CALLS tool calls or AGENT_MAX_OUTPUT_TOKENS output tokens. An end user who has used
# USER_DAILY_TOKENS tokens today (UTC) is refused new runs until midnight UTC. Unset: no limit.
def _limit(name: str) -> int | None:
    return _whole(name, 0, minimum=1) or None


AGENT_MAX_REQUESTS = _whole("AGENT_MAX_REQUESTS", 50, minimum=1)
AGENT_MAX_TOOL_CALLS = _limit("AGENT_MAX_TOOL_CALLS")
AGENT_MAX_OUTPUT_TOKENS = _limit("AGENT_MAX_OUTPUT_TOKENS")
USER_DAILY_TOKENS = _limit("USER_DAILY_TOKENS")


_RATE = re.compile(r"[1-9]\d*/(s|sec|second|m|min|minute|h|hour|d|day)")


def _throttle_rates(spec: str) -> dict[str, str]:
    """`runs_user=30/min,runs_key=1200/min,key=6000/min`, or `off`."""
    if spec.strip().lower() == "off":
        return {}
    try:
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        rates = {scope.strip(): rate.strip() for scope, rate in pairs}
    except ValueError as exc:
        raise ImproperlyConfigured(f"THROTTLE_RATES {spec!r} is not scope=rate,...") from exc
    unknown = set(rates) - {"runs_user", "runs_key", "key"}
    if unknown:
        raise ImproperlyConfigured(f"THROTTLE_RATES names unknown scopes: {', '.join(sorted(unknown))}")
    # DRF parses a rate on every request: one it cannot parse would fail them all.
    malformed = sorted(f"{scope}={rate}" for scope, rate in rates.items() if not _RATE.fullmatch(rate))
    if malformed:
        raise ImproperlyConfigured(f"THROTTLE_RATES rates must be N/s, N/min, N/hour or N/day: {', '.join(malformed)}")
    return rates


# Requests per API key (or signed-in user) on every endpoint, and runs started per end user and per key.
THROTTLE_RATES = _throttle_rates(env.str("THROTTLE_RATES", default="runs_user=30/min,runs_key=1200/min,key=6000/min"))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "identity.authentication.APIKeyAuthentication",
        "identity.authentication.SessionUserAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["bankagent.parsers.StrictJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "bankagent.parsers.JSONOnlyNegotiation",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "bankagent.exceptions.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_CLASSES": ["bankagent.throttling.KeyRateThrottle"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "bankagent API",
    "DESCRIPTION": (
        "Conversations with pydantic-ai agents: threads, messages, blocking and streamed answers.\n\n"
        "Bodies are JSON objects (`application/json`; a JSON object sent as `text/plain`, form-encoded or without a "
        "type is read as JSON too), at most 65,536 bytes (413 `payload_too_large`). JSON is parsed strictly: "
        "NaN and Infinity, numbers that do not fit in 64 bits and nesting deeper than 64 levels answer 400 "
        "`malformed_json`, each with its own message. Every error is the `Error` object. A method a path does not "
        "list answers 405 `method_not_allowed` with an `Allow` header, an unknown path under `/api/` 404 "
        "`not_found`, and a Host outside the allowed hosts 400 `bad_host`."
    ),
    "VERSION": "1.0.0",
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Swagger UI's assets are served by this server, not fetched from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "MessageStatusEnum": "threads.models.Message.Status",
        "AnswerStatusEnum": ["complete", "incomplete", "awaiting_approval"],
    },
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "bankagent.schema.complete_schema"],
}


def _networks(name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated networks (`10.0.0.0/8`) or single addresses; one that is neither names itself at start-up."""
    try:
        return tuple(
            ipaddress.ip_network(item.strip(), strict=False)
            for item in os.environ.get(name, "").split(",")
            if item.strip()
        )
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be comma-separated networks such as 10.0.0.0/8: {exc}") from exc


# GET /metrics (bankagent.metrics): with METRICS_TOKEN, for whoever sends it as a bearer token; without it, for
# loopback and METRICS_ALLOWED_NETWORKS. First in MIDDLEWARE, it counts every response.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="").strip()
METRICS_ALLOWED_NETWORKS = _networks("METRICS_ALLOWED_NETWORKS")
MIDDLEWARE.insert(0, "bankagent.metrics.RequestMetricsMiddleware")
# Scrapers, like health probes, reach the process over plain http.
SECURE_REDIRECT_EXEMPT = [*SECURE_REDIRECT_EXEMPT, r"^metrics$"]

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").strip().upper()
if LOG_LEVEL not in logging.getLevelNamesMapping():
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {LOG_LEVEL!r}.")

LOG_FORMAT = env.str("LOG_FORMAT", default="plain").strip().lower() or "plain"
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every line says the request, user, thread and run it was logged in, those of them that are known.
    "filters": {"context": {"()": "bankagent.logs.ContextFilter"}},
    "formatters": {
        "plain": {"()": "bankagent.logs.PlainFormatter", "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "bankagent.logs.JSONFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
}


# Traces (OpenTelemetry), read from the standard variables; off unless they name an exporter or an OTLP endpoint.
# The exporter, the sampler and the resource read the rest of them (OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER,
# OTEL_RESOURCE_ATTRIBUTES, ...) themselves.
def _traces_exporters() -> list[str]:
    if _flag("OTEL_SDK_DISABLED", False):
        return []
    named = [name.strip().lower() for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not named:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        named = ["otlp"] if any(os.environ.get(name, "").strip() for name in endpoints) else []
    if "none" in named:
        return []
    if unknown := sorted(set(named) - {"otlp", "console"}):
        raise ImproperlyConfigured(f"OTEL_TRACES_EXPORTER must name otlp, console or none, not {unknown[0]!r}.")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )
    if "otlp" in named and protocol != "http/protobuf":
        raise ImproperlyConfigured(
            f"OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL must be http/protobuf (OTLP over HTTP), not {protocol!r}."
        )
    return named


TRACES_EXPORTERS = _traces_exporters()
OTEL_SERVICE_NAME = env.str("OTEL_SERVICE_NAME", default="").strip() or "bankagent"
OTEL_CAPTURE_CONTENT = _flag("OTEL_CAPTURE_CONTENT", False)
"""Prompts, answers, tool arguments and results in the model's and tools' spans: off, as they are the customer's."""
