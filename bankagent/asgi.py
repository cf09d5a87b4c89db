import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402 - needs the app registry loaded above

from bankagent.middleware import ASGIBodyLimit  # noqa: E402

application = ProtocolTypeRouter({"http": ASGIBodyLimit(django_asgi_app)})
