"""ComfyUI's websocket (``/ws?clientId=``): the connected clients, its message shapes and its binary preview frames.

Messages are ``{"type": event, "data": {...}}`` text frames, sent to one client (``sid``) or to every client
(``sid=None``), as ComfyUI's ``PromptServer.send_sync`` does. They come from the pipeline thread: ``send`` may be
called from any thread; the message is encoded there and handed to the event loop, which puts it on each client's
own bounded queue, drained by one sender task per client. A client that is slow or gone never blocks the sender
of a message: when its queue is full, previews are dropped first, then progress messages, and a client whose
queue is still full is disconnected. A latent preview is ComfyUI's binary frame: a 4-byte big-endian event type
(1, PREVIEW_IMAGE), a 4-byte image type (1 JPEG, 2 PNG), then the image file.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
IMAGE_TYPES = {"JPEG": 1, "PNG": 2}
MAX_PREVIEW_SIZE = 512  # ComfyUI's MAX_PREVIEW_RESOLUTION: previews are scaled to fit this square
MAX_CLIENT_QUEUE = 256  # messages waiting for one client
MAX_CLIENT_ID = 256  # characters of a clientId
# What a full client queue drops first: previews, then progress (each superseded by the next), never the rest.
DROP_RANK = {"preview": 2, "progress": 1, "progress_state": 1}


def preview_frame(image: Any, image_type: str = "JPEG", max_size: int = MAX_PREVIEW_SIZE) -> bytes:
    """A PIL image as ComfyUI's binary preview frame, scaled to fit ``max_size`` (JPEG quality 95, as ComfyUI)."""
    from PIL import Image, ImageOps

    if max(image.size) > max_size:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    buffer.write(struct.pack(">I", PREVIEW_IMAGE))
    buffer.write(struct.pack(">I", IMAGE_TYPES[image_type]))
    image.convert("RGB").save(buffer, format=image_type, quality=95, compress_level=1)
    return buffer.getvalue()


def status_data(queue_remaining: int, sid: str | None = None) -> dict[str, Any]:
    """The data of a ``status`` message (with ``sid`` only in the first message a client gets)."""
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
    if sid is not None:
        data["sid"] = sid
    return data


@dataclass(eq=False)
class _Client:
    sid: str
    websocket: Any
    queue: deque[tuple[int, str | bytes]] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task[None] | None = None
    dropped: int = 0


class Clients:
    """The connected websocket clients by id, and the messages on their way to them.

    ``status`` gives the data of the first ``status`` message a client gets (``status_data``) and ``reconnect``
    the messages a client that reconnects with the id of the running prompt's client gets; ``features`` is what
    the server answers a client's ``feature_flags`` message with.
    """

    def __init__(
        self,
        status: Callable[[str], dict[str, Any]],
        reconnect: Callable[[str], list[tuple[str, dict[str, Any]]]] = lambda sid: [],
        features: dict[str, Any] | None = None,
        max_queue: int = MAX_CLIENT_QUEUE,
    ) -> None:
        self._status, self._reconnect = status, reconnect
        self.features = features or {}
        self.max_queue = max_queue
        self._clients: dict[str, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def bind(self) -> None:
        """Remember the running event loop (call from a coroutine on the serving loop before messages flow)."""
        with self._lock:
            self._loop = asyncio.get_running_loop()

    @property
    def ids(self) -> list[str]:
        return list(self._clients)

    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send ``{"type": event, "data": data}`` to client ``sid`` (None: every client); from any thread."""
        text = json.dumps({"type": event, "data": data}, default=str)
        self._hand_over(DROP_RANK.get(event, 0), text, sid)

    def send_preview(self, frame: bytes, sid: str | None = None) -> None:
        """Send a binary preview frame (``preview_frame``) to ``sid`` (None: every client); from any thread."""
        self._hand_over(DROP_RANK["preview"], frame, sid)

    def _hand_over(self, rank: int, payload: str | bytes, sid: str | None) -> None:
        with self._lock:
            loop = self._loop
        if loop is None or loop.is_closed():
            return  # nobody ever connected, or the server has stopped: nobody to tell
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(self._enqueue, rank, payload, sid)

    def _enqueue(self, rank: int, payload: str | bytes, sid: str | None) -> None:
        if sid is None:
            targets = list(self._clients.values())
        else:
            client = self._clients.get(sid)
            targets = [client] if client is not None else []  # a client not connected misses it, as in ComfyUI
        for client in targets:
            self._put(client, rank, payload)

    def _put(self, client: _Client, rank: int, payload: str | bytes) -> None:
        if len(client.queue) >= self.max_queue:
            worst = max((r for r, _ in client.queue), default=0)  # the most droppable message waiting
            client.dropped += 1
            if worst > 0 and worst >= rank:  # drop the oldest of those (a newer preview or progress replaces it)
                del client.queue[next(i for i, (r, _) in enumerate(client.queue) if r == worst)]
            elif rank > 0:  # the new message is the most droppable one
                return
            else:
                log.warning("websocket client %s does not keep up (%d messages waiting): disconnected",
                            client.sid, len(client.queue))  # fmt: skip
                self._drop_client(client)
                return
        client.queue.append((rank, payload))
        client.ready.set()

    def _drop_client(self, client: _Client) -> None:
        if self._clients.get(client.sid) is client:
            del self._clients[client.sid]
        client.queue.clear()
        if client.sender is not None:
            client.sender.cancel()
        asyncio.get_running_loop().create_task(_close(client.websocket, 1013))

    async def serve(self, websocket: Any, client_id: str | None) -> None:
        """Run one client's connection (a Starlette ``WebSocket`` not yet accepted) until it closes."""
        self.bind()
        await websocket.accept()
        sid = client_id or uuid.uuid4().hex
        old = self._clients.pop(sid, None)
        if old is not None:  # the same id again: the new connection replaces the old one (as ComfyUI does)
            self._drop_client(old)
        client = _Client(sid, websocket)
        self._clients[sid] = client
        client.sender = asyncio.create_task(self._drain(client), name=f"sdtrt-ws-{sid[:12]}")
        self._put(client, 0, json.dumps({"type": "status", "data": self._status(sid)}))
        for event, data in self._reconnect(sid):
            self._put(client, 0, json.dumps({"type": event, "data": data}))
        try:
            await self._receive(client)
        finally:
            if self._clients.get(sid) is client:
                del self._clients[sid]
            client.sender.cancel()
            if client.dropped:
                log.info("websocket client %s: %d messages dropped (it did not keep up)", sid, client.dropped)

    async def _receive(self, client: _Client) -> None:
        """Read what the client sends until it disconnects; its first message may be ComfyUI's ``feature_flags``."""
        first = True
        while True:
            message = await client.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if first and text:
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict) and parsed.get("type") == "feature_flags":
                    self._put(client, 0, json.dumps({"type": "feature_flags", "data": self.features}))
            first = False

    async def _drain(self, client: _Client) -> None:
        try:
            while True:
                await client.ready.wait()
                while client.queue:
                    _, payload = client.queue.popleft()
                    if isinstance(payload, bytes):
                        await client.websocket.send_bytes(payload)
                    else:
                        await client.websocket.send_text(payload)
                client.ready.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection broke: the receive loop sees it close and cleans up
            log.info("websocket client %s: send failed (%s)", client.sid, type(exc).__name__)
            if self._clients.get(client.sid) is client:
                del self._clients[client.sid]


async def _close(websocket: Any, code: int) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code)
