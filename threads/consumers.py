"""The thread websocket: `query`, `cancel`, `resume`, `approval` and `ping` frames in, the events of every run on the
thread out, each of a run once and in order, a resumed run's missed ones first."""

import asyncio
import contextlib
import logging
import uuid
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from rest_framework.exceptions import APIException, ValidationError

from agents.registry import AGENTS
from bankagent import context
from bankagent.db import db, serve_outside_requests
from bankagent.exceptions import (
    ApplicationError,
    BadFrame,
    NotFound,
    PayloadTooLarge,
    ResumeExpired,
    ServiceUnavailable,
    ValidationFailed,
    as_application_error,
)
from bankagent.jsontypes import JSONObject
from bankagent.metrics import record_websocket
from bankagent.parsers import loads_strict
from bankagent.throttling import check_run_throttles, throttling_on
from identity.authentication import Principal, SocketCredentials, authenticate_socket
from runs.events import Backlog, BacklogFull, Dialect, Event, encode, error_event
from runs.hub import hub
from runs.pipeline import start_decision, start_stream
from runs.resume import Catchup, resume, resume_point
from threads.models import Thread
from threads.selectors import thread_get_for_user
from threads.serializers import ApprovalFrameSerializer, QueryFrameSerializer

logger = logging.getLogger(__name__)

CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
"""The service cannot serve the socket now (its channel layer is down, or the client fell too far behind)."""
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404


FRAMES = frozenset({"query", "cancel", "resume", "approval", "ping"})


def parse_frame(text: str | None) -> JSONObject:
    if text is None:
        raise BadFrame("Binary frames are not accepted: send JSON text.")
    if len(text.encode("utf-8", "surrogatepass")) > settings.MAX_BODY_BYTES:
        raise PayloadTooLarge(f"Frames are limited to {settings.MAX_BODY_BYTES:,} bytes.")
    try:
        frame = loads_strict(text)
    except ApplicationError as exc:
        raise BadFrame("The frame is not valid JSON.") from exc
    if not isinstance(frame, dict) or frame.get("type") not in FRAMES:
        raise BadFrame()
    return frame


class ThreadConsumer(AsyncWebsocketConsumer):
    # Events reach the socket through its process's hub, which holds one channel for all sockets: a channel of
    # each socket's own would only add a receive loop per socket.
    channel_layer_alias = "sockets-use-the-hub"

    thread: Thread | None = None
    credentials: SocketCredentials | None = None
    writer: asyncio.Task | None = None
    closing: asyncio.Task | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.catchup = Catchup()

    async def connect(self) -> None:
        serve_outside_requests()
        try:
            thread_id = uuid.UUID(self.scope["url_route"]["kwargs"]["thread_id"])
        except ValueError:
            return await self._refuse(CLOSE_NOT_FOUND)
        try:
            credentials = await authenticate_socket(self.scope, thread_id)
            if credentials is None:
                return await self._refuse(CLOSE_UNAUTHORIZED)
            thread = await db(thread_get_for_user)(thread_id=thread_id, user_id=credentials.principal.user_id)
        except NotFound:
            return await self._refuse(CLOSE_NOT_FOUND)
        except Exception as exc:
            # The database or Redis (tickets) failing: the client is told so, as an HTTP client would be.
            error = as_application_error(exc)
            code = CLOSE_TRY_AGAIN_LATER if error.status_code == 503 else CLOSE_INTERNAL_ERROR
            return await self._refuse(code, error)
        context.bind(user_id=credentials.principal.user_id, thread_id=thread.pk)
        spec = AGENTS.get(thread.agent_type)
        self.backlog = Backlog(cumulative=spec is None or spec.structured, max_events=settings.STREAM_BACKLOG_EVENTS)
        self.dialect = Dialect(credentials.principal.events)
        resuming = self._resume_asked()
        try:
            await hub().watch(thread.pk, self)
        except Exception:
            logger.warning("Refusing a socket on thread %s: the channel layer is down", thread.pk, exc_info=True)
            return await self._refuse(CLOSE_TRY_AGAIN_LATER, ServiceUnavailable())
        self.thread, self.credentials = thread, credentials
        record_websocket(opened=True)
        await self.accept()
        self.writer = asyncio.create_task(self._write())
        self.writer.add_done_callback(self._writer_done)
        if resuming is not None:
            await self.receive_frame({"type": "resume", **resuming})

    def _resume_asked(self) -> JSONObject | None:
        """The run the handshake asks to resume (`?resume=<message_id>&after=N`), its live events held back from
        the moment the socket hears the thread; a malformed point is answered once the socket is open."""
        asked = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        if not asked.get("resume"):
            return None
        point: JSONObject = {"message_id": asked["resume"][0], "after": asked.get("after", ["0"])[0]}
        with contextlib.suppress(APIException):
            message_id, after = resume_point(point["message_id"], point["after"])
            self.catchup.hold(str(message_id), after)
        return point

    async def _refuse(self, code: int, error: APIException | None = None) -> None:
        # A close code, and the error event before it, reach the client only after the handshake is accepted.
        await self.accept()
        await self._close_with(code, error)

    async def _close_with(self, code: int, error: APIException | None = None) -> None:
        if error is not None:
            await self.send(text_data=encode(error_event(error), Dialect.STANDARD))
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        if self.thread is not None:
            record_websocket(opened=False)
            await hub().unwatch(self.thread.pk, self)
        if self.writer is not None:
            self.writer.cancel()

    def deliver(self, events: list[Event]) -> None:
        """Events for this socket; they wait in its backlog, never for the client."""
        self._put(self.catchup.admit(events))

    def _put(self, events: list[Event]) -> None:
        try:
            self.backlog.put_many(events)
        except BacklogFull:
            self._drop()

    def _drop(self) -> None:
        """Close a socket whose client fell too far behind, without waiting for it: its writer may be stuck in a
        send to that very client."""
        if self.closing is not None:
            return
        logger.info("Closing a socket on thread %s: its client fell too far behind", self.thread_id)
        if self.writer is not None:
            self.writer.cancel()
        self.closing = asyncio.create_task(self.close(code=CLOSE_TRY_AGAIN_LATER))

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        """A writer that failed leaves a socket that would never hear anything again: it is closed."""
        if writer.cancelled() or (error := writer.exception()) is None or self.closing is not None:
            return
        logger.warning("Closing a socket on thread %s: sending to it failed", self.thread_id, exc_info=error)
        self.closing = asyncio.create_task(self.close(code=CLOSE_INTERNAL_ERROR))

    async def _write(self) -> None:
        """The socket's one sender. Before each event it makes sure the socket's credentials still hold."""
        assert self.credentials is not None
        credentials = self.credentials
        with contextlib.suppress(BacklogFull):  # deliver() has dropped the socket
            while True:
                for event in await self.backlog.take():
                    if not credentials.heard_lately() and not await credentials.may_hear():
                        return await self._end_for_credentials()
                    if (text := encode(event, self.dialect)) is not None:
                        await self.send(text_data=text)

    async def _end_for_credentials(self) -> None:
        """Credentials that no longer hold end the socket as they would have refused its handshake; what was
        waiting for it is never sent."""
        assert self.credentials is not None
        self.closing = asyncio.current_task()
        await self._close_with(CLOSE_UNAUTHORIZED, self.credentials.failure)

    @property
    def thread_id(self) -> uuid.UUID | None:
        return None if self.thread is None else self.thread.pk

    async def websocket_receive(self, message: dict) -> None:
        if _frame_bytes(message) > settings.WS_MAX_FRAME_BYTES:
            # Past the hard limit, which the server enforces too, before it reads such a frame whole.
            return await self.close(code=CLOSE_TOO_BIG)
        await super().websocket_receive(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.thread is None:
            return
        try:
            frame = parse_frame(text_data)
        except Exception as exc:
            return self._error(as_application_error(exc))
        await self.receive_frame(frame)

    async def receive_frame(self, frame: JSONObject) -> None:
        try:
            await getattr(self, f"on_{frame['type']}")(frame)
        except ValidationError as exc:
            self._error(ValidationFailed.of(exc), frame.get("request_id"))
        except Exception as exc:
            # Whatever failed, the client hears why, and its socket stays open.
            self._error(as_application_error(exc), frame.get("request_id"))

    async def on_query(self, frame: JSONObject) -> None:
        serializer = QueryFrameSerializer(data=frame)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        principal = await self._acting()
        if throttling_on():
            await db(check_run_throttles)(principal)
        # The run answers through the thread's readers, this socket included.
        assert self.thread is not None
        await start_stream(
            user_id=principal.user_id,
            thread_id=self.thread.pk,
            query=data["query"],
            request_id=data.get("request_id"),
        )

    async def on_approval(self, frame: JSONObject) -> None:
        """The customer's decision on a tool call an answer of the thread waits for: the answer goes on, streamed to
        every socket on the thread."""
        serializer = ApprovalFrameSerializer(data=frame)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        principal = await self._acting()
        if throttling_on():
            await db(check_run_throttles)(principal)
        assert self.thread is not None
        await start_decision(
            user_id=principal.user_id,
            thread_id=self.thread.pk,
            approval_id=data["approval_id"],
            approved=data["approved"],
            note=data["note"],
            request_id=data.get("request_id"),
        )

    async def on_cancel(self, frame: JSONObject) -> None:
        await self._acting()
        assert self.thread is not None
        try:
            await hub().cancel(self.thread.pk)
        except Exception as exc:
            raise ServiceUnavailable("The cancel could not reach the run: the channel layer is down.") from exc

    async def on_resume(self, frame: JSONObject) -> None:
        """The events of a run of the thread after `after` that this socket has not had, then its live ones."""
        message_id, after = resume_point(frame.get("message_id"), frame.get("after"))
        assert self.thread is not None and self.credentials is not None
        resumed = await resume(
            self.catchup,
            thread_id=self.thread.pk,
            user_id=self.credentials.principal.user_id,
            message_id=message_id,
            after=after,
        )
        if not resumed.kept:
            self._put([error_event(ResumeExpired(), message_id=str(message_id))])
        self._put(resumed.missed)

    async def on_ping(self, frame: JSONObject) -> None:
        # Nothing to check: the pong, like every event, goes out only while the credentials hold.
        self.deliver([{"event": "pong"}])

    async def _acting(self) -> Principal:
        """Who a `query` or `cancel` acts for, once the socket's credentials are found to hold still. When they do
        not, the frame is refused with `authentication_failed`, and the writer, woken by that error, ends the
        socket."""
        assert self.credentials is not None
        if not await self.credentials.may_act():
            raise self.credentials.failure
        return self.credentials.principal

    def _error(self, error: APIException, request_id: object = None) -> None:
        extra = {"request_id": request_id} if isinstance(request_id, str) else {}
        self.deliver([error_event(error, **extra)])


def _frame_bytes(message: dict) -> int:
    if (text := message.get("text")) is not None:
        # Four bytes at most a code point: encode only a frame that might be over.
        return len(text) if len(text) * 4 <= settings.WS_MAX_FRAME_BYTES else len(text.encode("utf-8", "surrogatepass"))
    return len(message.get("bytes") or b"")
