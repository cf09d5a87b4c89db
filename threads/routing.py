from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from threads.consumers import ThreadConsumer

websocket_urlpatterns = [
    re_path(r"^ws/v1/threads/(?P<thread_id>[^/]+)/$", ThreadConsumer.as_asgi()),
    # Anything else is refused at the handshake rather than failing inside the router.
    re_path(r"", WebsocketDenier.as_asgi()),
]
