"""bankagent settings: everything that differs between machines comes from the environment."""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=False)

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
    "chat",
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

REDIS_URL = env.str("REDIS_URL", default="")
# Messages a channel may queue before sends to it are dropped. channels-redis counts one queue for all the
# sockets of a process, so this must hold a burst of events of every run the process streams at once.
CHANNEL_CAPACITY = env.int("CHANNEL_CAPACITY", default=100_000)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": CHANNEL_CAPACITY},
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": CHANNEL_CAPACITY}}
    }
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

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"

# The contract's body limit: 65,536 bytes accepted, one more refused (see bankagent.middleware).
DATA_UPLOAD_MAX_MEMORY_SIZE = 65_536

# The API uses no trailing slashes; a redirect would turn a POST into a GET.
APPEND_SLASH = False

SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# Agents
AGENT_MODEL = env.str("AGENT_MODEL", default="demo")
DEMO_MODEL_DELAY_MS = env.int("DEMO_MODEL_DELAY_MS", default=25)
# How many earlier exchanges of a thread the model sees.
AGENT_HISTORY_TURNS = env.int("AGENT_HISTORY_TURNS", default=20)
# A run holds its thread for this long past its last heartbeat (it beats every third of it).
RUN_LEASE_SECONDS = env.float("RUN_LEASE_SECONDS", default=30)
WS_TICKET_SECONDS = 60

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
}

SPECTACULAR_SETTINGS = {
    "TITLE": "bankagent API",
    "DESCRIPTION": "Conversations with pydantic-ai agents: threads, messages, blocking and streamed answers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Swagger UI's assets are served by this server, not fetched from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
