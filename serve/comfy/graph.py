"""The interpreter of ComfyUI API-format graphs: what runs, in which order, what is cached between prompts.

``validate_prompt`` (``validation``) says which output nodes a prompt runs. ``GraphExecutor.execute`` runs what
those outputs need, depth first from each output (the output needing the fewest nodes first, as ComfyUI), every
node after its inputs. Outputs are cached as ComfyUI's default ("classic") cache does: by input signature (the
class, the literal inputs, what ``Node.changed`` says, e.g. a loaded file's digest, and the signatures of the
linked nodes), and only the signatures of the latest prompt are kept, so the cache never holds more than one
prompt's values. A node whose signature is cached does not run; ``execution_cached`` names every node of the
prompt whose output is cached, before the first ``executing``; a cached output node sends its cached ui again as
``executed`` (ComfyUI does, so a client sees the image of a prompt that ran nothing). The cache holds latents,
conditionings, images and model handles, never a pipeline: a handle asks ``ExecutionContext.pipeline`` for the
model each time it is used, so closing a model leaves nothing of it in the cache.

A node that raises stops the prompt with ``NodeFailed`` (ComfyUI's execution_error fields) and is not cached; the
cancel event (checked before each node and between sampling steps) stops it with ``ExecutionInterrupted``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .node import NodeInterrupted, NodeRun, declared_inputs, full_type_name
from .types import describe
from .validation import PromptError, is_link, link_target, literal_value, validate_prompt

__all__ = [
    "ExecutionContext",
    "ExecutionEvents",
    "ExecutionInterrupted",
    "GraphExecutor",
    "NodeFailed",
    "PromptError",
    "validate_prompt",
]


class ExecutionEvents(Protocol):
    """What a running prompt reports, on the pipeline thread, in ComfyUI's order."""

    def execution_cached(self, nodes: list[str]) -> None: ...

    def executing(self, node: str) -> None: ...

    def progress(self, node: str, value: int, maximum: int, preview: Any) -> None: ...

    def executed(self, node: str, output: dict) -> None: ...


@dataclass
class ExecutionContext:
    """What one prompt runs with: the pipeline opener (the server's PipelinePool), its cancel event, whether
    progress events carry latent previews, its id, and its ``extra_data`` (``extra_pnginfo`` goes into PNGs)."""

    pipeline: Callable[[Any], Any]
    cancel: threading.Event
    previews: bool = False
    prompt_id: str = ""
    extra_data: dict[str, Any] = field(default_factory=dict)


class NodeFailed(Exception):
    """A node raised while running: ComfyUI's execution_error fields (``message_data()``); ``current_inputs`` maps
    each input to its value as text, ``current_outputs`` lists the nodes whose outputs were at hand (cached or run),
    as ComfyUI's execution_error does."""

    def __init__(
        self,
        node_id: str,
        node_type: str,
        exception_type: str,
        exception_message: str,
        traceback: list[str],
        executed: list[str] | None = None,
        current_inputs: dict[str, Any] | None = None,
        current_outputs: list[str] | None = None,
    ) -> None:
        super().__init__(f"node {node_id} ({node_type}) failed: {exception_type}: {exception_message}")
        self.node_id, self.node_type = node_id, node_type
        self.exception_type, self.exception_message, self.traceback = exception_type, exception_message, traceback
        self.executed = list(executed or [])
        self.current_inputs, self.current_outputs = current_inputs or {}, list(current_outputs or [])

    def message_data(self) -> dict[str, Any]:
        """The execution_error message's fields besides prompt_id."""
        return {
            "node_id": self.node_id,
            "node_type": self.node_type,
            "executed": self.executed,
            "exception_message": self.exception_message,
            "exception_type": self.exception_type,
            "traceback": self.traceback,
            "current_inputs": self.current_inputs,
            "current_outputs": self.current_outputs,
        }


class ExecutionInterrupted(Exception):
    """The prompt's cancel event stopped it before or inside ``node_id``."""

    def __init__(self, node_id: str, node_type: str, executed: list[str]) -> None:
        super().__init__(f"interrupted at node {node_id} ({node_type})")
        self.node_id, self.node_type, self.executed = node_id, node_type, list(executed)


@dataclass
class CacheEntry:
    outputs: tuple
    ui: dict | None


@dataclass
class PromptRun:
    """One prompt while it runs: what it is, the outputs at hand, what ran."""

    prompt: dict
    signatures: Signatures
    context: ExecutionContext
    events: ExecutionEvents
    cached: set[str]
    values: dict[str, tuple] = field(default_factory=dict)  # outputs of the nodes run or reported in this prompt
    executed: list[str] = field(default_factory=list)

    def at_hand(self) -> list[str]:
        """The nodes whose outputs are available now (cached or run), in prompt order."""
        return [n for n in self.prompt if n in self.values or n in self.cached]


class GraphExecutor:
    """Runs validated prompts for one ``NodeLibrary``, keeping the last prompt's outputs for the next one.

    Call ``execute`` from one thread at a time (the server's pipeline thread)."""

    def __init__(self, library: Any) -> None:
        self.library = library
        self.cache: dict[str, CacheEntry] = {}

    def execute(
        self, prompt: dict, outputs: list[str], context: ExecutionContext, events: ExecutionEvents
    ) -> dict[str, dict]:
        """Run what ``outputs`` need; the ui outputs per output node id (cached ones included)."""
        signatures = Signatures(prompt, self.library)
        current = {signatures.get(n) for n in prompt} - {None}
        self.cache = {key: entry for key, entry in self.cache.items() if key in current}
        cached = {n for n in prompt if signatures.get(n) in self.cache}
        events.execution_cached([n for n in prompt if n in cached])
        state = PromptRun(prompt, signatures, context, events, cached)
        ui_outputs: dict[str, dict] = {}
        for node_id in execution_order(prompt, outputs, cached):
            signature = signatures.get(node_id)
            entry = self.cache.get(signature) if signature is not None else None
            if entry is None:
                entry = self.run_node(state, node_id)
                if signature is not None:
                    self.cache[signature] = entry
                state.executed.append(node_id)
            # else: a cached output node; its ui is sent again, nothing runs
            state.values[node_id] = entry.outputs
            if entry.ui is not None:
                ui_outputs[node_id] = entry.ui
                events.executed(node_id, entry.ui)
        return ui_outputs

    def run_node(self, state: PromptRun, node_id: str) -> CacheEntry:
        """Run one node on its gathered inputs (``executing`` first); its outputs and ui."""
        class_type = state.prompt[node_id]["class_type"]
        if state.context.cancel.is_set():
            raise ExecutionInterrupted(node_id, class_type, state.executed)
        cls = self.library.get(class_type)
        inputs: dict[str, Any] = {}
        try:
            inputs = self.gather(state, node_id, cls)
            state.events.executing(node_id)
            result = cls().run(self.node_run(state, node_id), **inputs)
        except NodeInterrupted:
            raise ExecutionInterrupted(node_id, class_type, state.executed) from None
        except Exception as exc:
            raise NodeFailed(
                node_id,
                class_type,
                full_type_name(type(exc)),
                str(exc),
                traceback.format_tb(exc.__traceback__),
                state.executed,
                {name: [describe(v)] for name, v in inputs.items()},
                state.at_hand(),
            ) from exc
        if isinstance(result, dict):
            return CacheEntry(tuple(result.get("result", ())), result.get("ui"))
        return CacheEntry(tuple(result), None)

    def node_run(self, state: PromptRun, node_id: str) -> NodeRun:
        """What node ``node_id`` may use while it runs."""
        events, context = state.events, state.context
        return NodeRun(
            node_id=node_id,
            pipeline=context.pipeline,
            cancel=context.cancel,
            folders=self.library.folders,
            library=self.library,
            progress=lambda value, maximum, preview: events.progress(node_id, value, maximum, preview),
            previews=context.previews,
            prompt=state.prompt,
            extra_pnginfo=context.extra_data.get("extra_pnginfo"),
        )

    def gather(self, state: PromptRun, node_id: str, cls: Any) -> dict:
        """A node's inputs: linked outputs (run now or cached) and literals as their declared type."""
        declared = declared_inputs(cls.input_types(self.library))
        inputs = {}
        for name, value in state.prompt[node_id].get("inputs", {}).items():
            if is_link(value):
                source, index = value
                outputs = state.values.get(source)
                if outputs is None:  # cached, so not run in this prompt
                    outputs = self.cache[state.signatures.get(source)].outputs
                inputs[name] = outputs[index]
            elif name in declared:
                inputs[name] = literal_value(declared[name][1][0], value)
            else:  # a frontend-only input the node accepts and ignores (LoadImage's "upload")
                inputs[name] = value
        return inputs


def execution_order(prompt: dict, outputs: list[str], cached: set[str]) -> list[str]:
    """Every node the outputs need, each after its inputs: depth first from each output, the output needing the
    fewest uncached nodes first; cached nodes are not entered (a cached output node is listed, to report it)."""

    def needs(start: str) -> list[str]:
        order: list[str] = []
        seen = {start}
        stack = [(start, iter(linked_inputs(prompt, start)))]
        while stack:
            node, it = stack[-1]
            nxt = next((t for t in it if t not in seen and t not in cached and t not in done), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(linked_inputs(prompt, nxt))))
        return order

    done: set[str] = set()
    result: list[str] = []
    pending = list(outputs)
    while pending:
        counts = {o: len(needs(o)) for o in pending}
        nxt = min(pending, key=lambda o: (counts[o], pending.index(o)))
        pending.remove(nxt)
        for node in needs(nxt):
            if node not in done:
                done.add(node)
                result.append(node)
    return result


def linked_inputs(prompt: dict, node_id: str) -> list[str]:
    """The nodes ``node_id``'s inputs link to, in input order."""
    targets = []
    for value in prompt[node_id].get("inputs", {}).values():
        target = link_target(value, prompt) if is_link(value) else None
        if target is not None:
            targets.append(target)
    return targets


class Signatures:
    """Each node's input signature (a digest of its class, ``changed``, literals and upstream signatures), or None
    for a node whose links cannot be followed (never cached)."""

    def __init__(self, prompt: dict, library: Any) -> None:
        self.prompt, self.library = prompt, library
        self.memo: dict[str, str | None] = {}

    def get(self, node_id: str) -> str | None:
        if node_id not in self.memo:
            self.memo[node_id] = None  # a cycle reaches this node again: no signature
            self.memo[node_id] = self.compute(node_id)
        return self.memo[node_id]

    def compute(self, node_id: str) -> str | None:
        node = self.prompt[node_id]
        cls = self.library.get(node.get("class_type"))
        if cls is None or not isinstance(node.get("inputs", {}), dict):
            return None
        parts: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                target = link_target(value, self.prompt)
                upstream = self.get(target) if target is not None else None
                if upstream is None:
                    return None
                parts[name] = ["link", upstream, value[1]]
            else:
                parts[name] = value
        try:
            changed = cls.changed(self.library, {k: v for k, v in parts.items() if not isinstance(v, list)})
        except Exception:  # a node that cannot say: never cached
            return None
        text = json.dumps([cls.NAME, changed, parts], sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()
