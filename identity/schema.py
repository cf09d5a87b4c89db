"""How the OpenAPI schema names the ways a request is authenticated (drf-spectacular extensions)."""

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.permissions import SAFE_METHODS

API_KEY_SCHEME = "ApiKeyAuth"
SESSION_SCHEME = "sessionAuth"
CSRF_SCHEME = "csrfToken"


class APIKeyScheme(OpenApiAuthenticationExtension):
    target_class = "identity.authentication.APIKeyAuthentication"
    name = API_KEY_SCHEME

    def get_security_definition(self, auto_schema: object) -> dict:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "A key from `manage.py create_api_key` or the admin. Requests that send it must also "
            "send `X-User-ID`, the end user the key holder acts for.",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    """The chat page's calls: the session cookie, and on unsafe methods the CSRF token as well."""

    target_class = "identity.authentication.SessionUserAuthentication"
    name = [SESSION_SCHEME, CSRF_SCHEME]

    def get_security_requirement(self, auto_schema: object) -> dict:
        if getattr(auto_schema, "method", "GET") in SAFE_METHODS:
            return {SESSION_SCHEME: []}
        return {SESSION_SCHEME: [], CSRF_SCHEME: []}

    def get_security_definition(self, auto_schema: object) -> list[dict]:
        return [
            {
                "type": "apiKey",
                "in": "cookie",
                "name": settings.SESSION_COOKIE_NAME,
                "description": "A signed-in user of the chat page (`/chat/`), acting as its profile's end user.",
            },
            {
                "type": "apiKey",
                "in": "header",
                "name": "X-CSRFToken",  # Django's CSRF_HEADER_NAME, which this project leaves as it is
                "description": "The CSRF token of the chat page, required with the session on unsafe methods.",
            },
        ]
