from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from bankagent.metrics import metrics_view
from bankagent.views import HealthView, api_not_found
from identity.authentication import APIKeyAuthentication
from runs.views import UsageView
from threads.views import (
    AgentQueryView,
    AgentStreamView,
    AgentViewSet,
    AGUIView,
    ApprovalDecisionView,
    RunEventsView,
    ThreadViewSet,
    UIStreamView,
)

router = SimpleRouter(trailing_slash=False)
router.register("threads", ThreadViewSet, basename="thread")

api_v1 = [
    *router.urls,
    path("agents", AgentViewSet.as_view({"get": "list"}), name="agent-list"),
    path("agent/query", AgentQueryView.as_view(), name="agent-query"),
    path("agent/stream", AgentStreamView.as_view(), name="agent-stream"),
    path("threads/<str:pk>/runs/<str:message_id>/events", RunEventsView.as_view(), name="run-events"),
    path("threads/<str:pk>/approvals/<str:approval_id>", ApprovalDecisionView.as_view(), name="approval-decide"),
    path("threads/<str:pk>/ui-stream", UIStreamView.as_view(), name="ui-stream"),
    path("threads/<str:pk>/ag-ui", AGUIView.as_view(), name="ag-ui"),
    # Tickets stand in for an API key in a browser; the chat page's own socket uses its session instead.
    path(
        "ws-tickets",
        AgentViewSet.as_view({"post": "ticket"}, authentication_classes=[APIKeyAuthentication]),
        name="ws-ticket",
    ),
    path("usage", UsageView.as_view(), name="usage"),
    path("health", HealthView.as_view(), name="health"),
]

urlpatterns = [
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularJSONAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    re_path(r"^api/", api_not_found),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("", include("chat.urls")),
]

handler404 = "bankagent.views.api_not_found"
handler500 = "bankagent.views.server_error"
