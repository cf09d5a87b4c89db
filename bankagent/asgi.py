import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
django_asgi_app = get_asgi_application()

# Imported once the app registry is ready.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import OriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from bankagent import telemetry  # noqa: E402
from bankagent.context import ASGIRequestId  # noqa: E402
from bankagent.middleware import ASGIApp, ASGIBodyLimit, ASGIHeadWithoutBody  # noqa: E402
from threads.routing import websocket_urlpatterns  # noqa: E402


class BrowserOriginValidator(OriginValidator):
    """Browsers always send Origin, which must name an allowed host; server-to-server clients send none."""

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or super().valid_origin(parsed_origin)


router = ProtocolTypeRouter(
    {
        "http": ASGIHeadWithoutBody(ASGIBodyLimit(django_asgi_app)),
        "websocket": BrowserOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns)), settings.ALLOWED_HOSTS
        ),
    }
)


def wrapped(app: ASGIApp) -> ASGIApp:
    """`app` behind what every request and websocket passes first: its request id, then its span when tracing is
    on (inside, so that the span knows the id)."""
    return ASGIRequestId(telemetry.traced(app))


telemetry.setup()  # once in each worker process, as it loads the application
application = wrapped(router)

# Everything imported so far lives as long as the process: leave it out of every garbage collection from now on,
# which otherwise walks the whole of Django and pydantic-ai again and again under load.
gc.freeze()
