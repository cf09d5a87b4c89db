from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from agents.registry import AGENTS

# The page loads its own script and style only, and talks to its own origin only (`'self'` covers ws:/wss:).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def content_security_policy(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    return wrapped


@content_security_policy
@login_required
def chat_page(request: HttpRequest) -> HttpResponse:
    agents = [
        {
            "agent_type": spec.agent_type,
            "label": spec.agent_type.replace("_", " ").capitalize(),
            "description": spec.description,
            "structured": spec.structured,
        }
        for spec in AGENTS.values()
    ]
    return render(request, "chat/chat.html", {"agents": agents, "config": {"agents": agents}})
