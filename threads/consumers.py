"""The thread websocket: `query`, `cancel` and `ping` frames in, the thread's run events out."""

import json
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from rest_framework.exceptions import ValidationError

from agents.fanout import request_cancel, start_stream, thread_group
from agents.streaming import error_event
from bankagent.exceptions import ApplicationError, BadFrame, NotFound, PayloadTooLarge, ValidationFailed
from bankagent.parsers import loads_strict
from identity.authentication import authenticate_socket
from threads.selectors import thread_get_for_user
from threads.serializers import QueryFrameSerializer

MAX_FRAME_BYTES = 65_536
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404


def parse_frame(text: str | None) -> dict[str, Any]:
    if text is None:
        raise BadFrame("Binary frames are not accepted: send JSON text.")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES:
        raise PayloadTooLarge("Frames are limited to 65,536 bytes.")
    try:
        frame = loads_strict(text)
    except ApplicationError as exc:
        raise BadFrame("The frame is not valid JSON.") from exc
    if not isinstance(frame, dict) or frame.get("type") not in ("query", "cancel", "ping"):
        raise BadFrame()
    return frame


class ThreadConsumer(AsyncWebsocketConsumer):
    thread: Any = None

    async def connect(self) -> None:
        try:
            thread_id = uuid.UUID(self.scope["url_route"]["kwargs"]["thread_id"])
        except ValueError:
            return await self._refuse(CLOSE_NOT_FOUND)
        principal = await authenticate_socket(self.scope, thread_id)
        if principal is None:
            return await self._refuse(CLOSE_UNAUTHORIZED)
        try:
            self.thread = await database_sync_to_async(thread_get_for_user)(
                thread_id=thread_id, user_id=principal.user_id
            )
        except NotFound:
            return await self._refuse(CLOSE_NOT_FOUND)
        await self.channel_layer.group_add(thread_group(self.thread.pk), self.channel_name)
        await self.accept()

    async def _refuse(self, code: int) -> None:
        # A close code reaches the client only after the handshake is accepted.
        await self.accept()
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        if self.thread is not None:
            await self.channel_layer.group_discard(thread_group(self.thread.pk), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.thread is None:
            return
        frame: dict[str, Any] = {}
        try:
            frame = parse_frame(text_data)
            await getattr(self, f"on_{frame['type']}")(frame)
        except ValidationError as exc:
            await self._send_error(ValidationFailed.of(exc), frame.get("request_id"))
        except ApplicationError as error:
            await self._send_error(error, frame.get("request_id"))

    async def on_query(self, frame: dict[str, Any]) -> None:
        serializer = QueryFrameSerializer(data=frame)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        # The run answers through the thread's group, this socket included.
        await start_stream(thread=self.thread, query=data["query"], request_id=data.get("request_id"), listen=False)

    async def on_cancel(self, frame: dict[str, Any]) -> None:
        await request_cancel(self.thread.pk)

    async def on_ping(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps({"event": "pong"}))

    async def run_event(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message["event"], ensure_ascii=False))

    async def _send_error(self, error: ApplicationError, request_id: object = None) -> None:
        extra = {"request_id": request_id} if isinstance(request_id, str) else {}
        await self.send(text_data=json.dumps(error_event(error, **extra), ensure_ascii=False))
