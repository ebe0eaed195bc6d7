"""ComfyUI's prompt queue on sdtrt's pipeline thread: pending prompts, the running one, history, interrupt.

A prompt that validated is an item of ComfyUI's queue, ``[number, prompt_id, prompt, extra_data, outputs]``,
ordered by ``number`` (``front`` puts it first). Each item queued also queues one turn on the server's pipeline
thread (``LocalWorker.submit``), so ComfyUI prompts and A1111 requests run one at a time in arrival order; a turn
runs the first pending prompt (which need not be the one that queued that turn: ``front`` and ``number`` reorder,
and a turn finds nothing to do when its prompt was deleted). A full server queue refuses the prompt
(``Overloaded``). The server's drain on SIGTERM waits for the worker's queue, so it runs every queued prompt.

Running a prompt sends ComfyUI's websocket messages in its order, to the prompt's ``client_id`` (``execution_start``,
``execution_cached``, ``executing``/``progress``/``executed`` per node, then ``execution_success``,
``execution_error`` or ``execution_interrupted``), then writes the history entry, broadcasts ``status`` and sends
``executing`` with ``node: null``. As in ComfyUI, a prompt without ``client_id`` still broadcasts its ``progress``
(and previews) and ``execution_interrupted``; its other messages are not sent. The history keeps the last
``max_history`` prompts (the oldest dropped first).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .messages import Clients, preview_frame, status_data

if TYPE_CHECKING:
    from sdtrt.serve.worker import LocalWorker

log = logging.getLogger(__name__)

PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")  # ComfyUI's; taesd falls back to latent2rgb
SECRET_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")  # the frontend's credentials: never kept


@dataclass(order=True)
class QueueItem:
    """One prompt of ComfyUI's queue; ``row`` is the list ``/queue`` and ``/history`` show."""

    number: float
    prompt_id: str
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)

    def row(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")


class PromptEvents:
    """The messages of one running prompt (the graph interpreter's ``ExecutionEvents``), as ComfyUI sends them,
    with what its history keeps: the status messages and the ui outputs."""

    def __init__(self, clients: Clients, item: QueueItem, previews: bool) -> None:
        self.clients, self.item, self.previews = clients, item, previews
        self.prompt_id, self.sid = item.prompt_id, item.client_id
        self.messages: list[list[Any]] = []
        self.outputs: dict[str, dict[str, Any]] = {}
        self.finished: list[str] = []
        self.cached: list[str] = []
        self.node: str | None = None  # the node running now

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """ComfyUI's ``PromptExecutor.add_message``: timestamped, kept for the history, sent to the prompt's
        client (to every client when it has none and ``broadcast``)."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.messages.append([event, data])
        if self.sid is not None or broadcast:
            self.clients.send(event, data, self.sid)

    def execution_cached(self, nodes: list[str]) -> None:
        self.cached = list(nodes)
        self.add_message("execution_cached", {"nodes": list(nodes), "prompt_id": self.prompt_id})

    def executing(self, node: str) -> None:
        if self.node is not None and self.node not in self.finished:
            self.finished.append(self.node)
        self.node = node
        if self.sid is not None:
            self.clients.send("executing", {"node": node, "display_node": node, "prompt_id": self.prompt_id}, self.sid)

    def progress(self, node: str, value: int, maximum: int, preview: Any = None) -> None:
        data = {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": node}
        self.clients.send("progress", data, self.sid)  # with no client: to everyone, as ComfyUI
        if preview is not None and self.previews:
            self.clients.send_preview(preview_frame(preview), self.sid)

    def executed(self, node: str, output: dict[str, Any]) -> None:
        self.outputs[node] = output
        if self.sid is not None:
            data = {"node": node, "display_node": node, "output": output, "prompt_id": self.prompt_id}
            self.clients.send("executed", data, self.sid)

    def meta(self) -> dict[str, dict[str, Any]]:
        """The history's ``meta``: per node with ui outputs, its ids (sdtrt has no subgraphs: all the same)."""
        return {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in self.outputs}


class ComfyJobs:
    """The queue, the running prompt and the history of ComfyUI prompts on ``worker``'s pipeline thread.

    ``executor`` is the graph interpreter (``graph.GraphExecutor``, used on the pipeline thread only); ``clients``
    the websocket clients told what happens; ``preview_method`` the previews of prompts whose ``extra_data``
    does not choose (``PREVIEW_METHODS``).
    """

    def __init__(
        self,
        worker: LocalWorker,
        executor: Any,
        clients: Clients | None = None,
        max_history: int = 200,
        preview_method: str = "none",
    ) -> None:
        self.worker, self.executor = worker, executor
        self.clients = clients or Clients(self.status_for)
        self.max_history, self.preview_method = max_history, preview_method
        self._lock = threading.RLock()
        self._pending: list[QueueItem] = []
        self._running: QueueItem | None = None
        self._events: PromptEvents | None = None
        self._cancel = threading.Event()
        self._history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._number = 0

    # -- the queue (on the event loop) ---------------------------------------------------------------------
    def next_number(self, front: bool) -> int:
        """ComfyUI's default ``number``: a counter, negative for ``front``."""
        with self._lock:
            number = -self._number if front else self._number
            self._number += 1
            return number

    def known(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is pending or running."""
        with self._lock:
            running = self._running is not None and self._running.prompt_id == prompt_id
            return running or any(item.prompt_id == prompt_id for item in self._pending)

    def put(self, item: QueueItem) -> None:
        """Queue ``item`` and its turn on the pipeline thread (``Overloaded`` if the server's queue is full)."""
        with self._lock:  # held while the turn is queued: no turn can take the item before it is known to fit
            turn = self.worker.submit(self._run_next)
            heapq.heappush(self._pending, item)
        turn.add_done_callback(_log_failure)
        self.queue_updated()

    def queue_remaining(self) -> int:
        with self._lock:
            return len(self._pending) + (self._running is not None)

    def status_for(self, sid: str | None = None) -> dict[str, Any]:
        return status_data(self.queue_remaining(), sid)

    def reconnect_messages(self, sid: str) -> list[tuple[str, dict[str, Any]]]:
        """What a client that reconnects while its prompt runs is told (ComfyUI: the node running)."""
        with self._lock:
            events = self._events
            if events is None or events.sid != sid or events.node is None:
                return []
            return [("executing", {"node": events.node})]

    def queue_updated(self) -> None:
        """Broadcast ``status`` (ComfyUI's ``queue_updated``); from any thread. Under the queue's lock, so the
        counts reach the clients in the order the queue changed."""
        with self._lock:
            self.clients.send("status", self.status_for())

    def queue_body(self) -> dict[str, list[list[Any]]]:
        """``GET /queue``."""
        with self._lock:
            running = [self._running.row()] if self._running is not None else []
            return {"queue_running": running, "queue_pending": [item.row() for item in sorted(self._pending)]}

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
        self.queue_updated()

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            gone = set(prompt_ids)
            self._pending = [item for item in self._pending if item.prompt_id not in gone]
            heapq.heapify(self._pending)
        self.queue_updated()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt between two steps (only if it is ``prompt_id``, when given); False if none."""
        with self._lock:
            if self._running is None or (prompt_id is not None and self._running.prompt_id != prompt_id):
                return False
            self._cancel.set()
            return True

    # -- history ---------------------------------------------------------------------------------------------
    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """``GET /history`` (ComfyUI's ``get_history``: the last ``max_items``, or from ``offset``) and
        ``GET /history/{prompt_id}``."""
        with self._lock:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: entry} if entry is not None else {}
            items = list(self._history.items())
        if offset < 0 and max_items is not None:
            offset = len(items) - max_items
        items = items[max(offset, 0) :]
        if max_items is not None:
            items = items[:max_items]
        return dict(items)

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._history.pop(prompt_id, None)

    # -- a turn on the pipeline thread -----------------------------------------------------------------------
    def _run_next(self, pool: Any) -> None:
        with self._lock:
            if not self._pending:
                return  # its prompt was deleted, or an earlier turn ran it
            item = heapq.heappop(self._pending)
            self._running, self._cancel = item, threading.Event()
            self._events = events = PromptEvents(self.clients, item, self._previews(item))
        self.queue_updated()
        try:
            success = self._execute(item, events, pool)
        finally:
            entry = {
                "prompt": item.row(),
                "outputs": events.outputs,
                "status": {"status_str": "success" if success else "error", "completed": success,
                           "messages": events.messages},
                "meta": events.meta(),
            }  # fmt: skip
            with self._lock:
                self._history.pop(item.prompt_id, None)
                self._history[item.prompt_id] = entry
                while len(self._history) > self.max_history:
                    self._history.popitem(last=False)
                self._running = self._events = None
            self.queue_updated()
            if item.client_id is not None:
                self.clients.send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)

    def _previews(self, item: QueueItem) -> bool:
        method = item.extra_data.get("preview_method", "default")
        method = self.preview_method if method == "default" else method
        return method != "none"

    def _execute(self, item: QueueItem, events: PromptEvents, pool: Any) -> bool:
        """Run ``item``'s graph; True if it succeeded. Every failure becomes a message (never an exception)."""
        from .graph import ExecutionContext, ExecutionInterrupted, NodeFailed

        events.add_message("execution_start", {"prompt_id": item.prompt_id})
        context = ExecutionContext(pipeline=pool.get, cancel=self._cancel, previews=events.previews,
                                   prompt_id=item.prompt_id, extra_data=item.extra_data)  # fmt: skip
        try:
            outputs = self.executor.execute(item.prompt, item.outputs, context, events)
        except ExecutionInterrupted as exc:
            data = {"prompt_id": item.prompt_id, "node_id": exc.node_id, "node_type": exc.node_type,
                    "executed": list(exc.executed)}  # fmt: skip
            events.add_message("execution_interrupted", data, broadcast=True)
            return False
        except NodeFailed as exc:
            events.add_message("execution_error", _error_data(item, events, exc))
            return False
        except Exception as exc:  # a bug outside any node: the prompt fails, the queue goes on
            log.exception("prompt %s failed", item.prompt_id)
            events.add_message("execution_error", _error_data(item, events, _as_failure(item, events, exc)))
            return False
        for node, output in (outputs or {}).items():
            events.outputs.setdefault(node, output)
        events.add_message("execution_success", {"prompt_id": item.prompt_id})
        return True


def _error_data(item: QueueItem, events: PromptEvents, exc: Any) -> dict[str, Any]:
    """ComfyUI's ``execution_error`` data."""
    return {
        "prompt_id": item.prompt_id,
        "node_id": exc.node_id,
        "node_type": exc.node_type,
        "executed": list(getattr(exc, "executed", None) or events.finished),
        "exception_message": exc.exception_message,
        "exception_type": exc.exception_type,
        "traceback": list(exc.traceback),
        "current_inputs": getattr(exc, "current_inputs", {}),
        "current_outputs": list(getattr(exc, "current_outputs", None) or events.cached),
    }


@dataclass
class _Failure:
    node_id: str | None
    node_type: str | None
    exception_type: str
    exception_message: str
    traceback: list[str]


def _as_failure(item: QueueItem, events: PromptEvents, exc: Exception) -> _Failure:
    import traceback

    node = events.node
    node_type = item.prompt.get(node, {}).get("class_type") if node is not None else None
    return _Failure(node, node_type, f"{type(exc).__module__}.{type(exc).__name__}", str(exc),
                    traceback.format_exception(exc))  # fmt: skip


def _log_failure(turn: Any) -> None:
    if not turn.cancelled() and turn.exception() is not None:
        log.error("a ComfyUI prompt's turn failed: %s", turn.exception())
