"""Checking a ComfyUI API-format prompt before it is queued, with ComfyUI's error bodies.

A prompt is ``{node_id: {"class_type": ..., "inputs": {name: literal | [node_id, output_index]}, "_meta": ...}}``.
``validate_prompt`` refuses, as ComfyUI's execution.validate_prompt does, a prompt that is not an object of nodes,
a node without or with an unknown class_type ("missing_node_type"), and a prompt without output nodes
("prompt_no_outputs"); then it checks every node an output needs and raises "prompt_outputs_failed_validation"
with ``node_errors`` {node_id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}} listing each
bad node with ComfyUI's error types. Beyond ComfyUI it also refuses, before any work: more than ``max_nodes``
nodes, a link to a node that is not in the prompt or to an output index it does not have, a dependency cycle
(ComfyUI finds those only while running), an input the node does not declare ("undeclared_input": ComfyUI ignores
it; a field that would be ignored is refused), a literal of the wrong JSON type (ComfyUI converts "5" to 5; here
an INT is a JSON integer, a FLOAT a number, a STRING a string, a BOOLEAN true/false), and a prompt where any
output fails (ComfyUI runs the outputs that pass; here the whole prompt is refused, so nothing runs half).
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any

from .node import declared_inputs, full_type_name

log = logging.getLogger(__name__)

NODE_KEYS = ("class_type", "inputs", "_meta")


class PromptError(Exception):
    """A prompt refused before it was queued: ``body()`` is ComfyUI's 400 body of ``POST /prompt``."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> None:
        self.error, self.node_errors = error, node_errors or {}
        super().__init__(f"{error['message']}: {error['details']}" if error.get("details") else error["message"])

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


def error(kind: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    """One error in ComfyUI's shape."""
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def link_target(value: Any, prompt: dict[str, Any]) -> str | None:
    """The node id a well-formed link to an existing node points at, else None."""
    if len(value) == 2 and isinstance(value[0], str) and value[0] in prompt and _index(value[1]):
        return value[0]
    return None


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def literal_value(kind: Any, value: Any) -> Any:
    """``value`` as the node gets it for an input of ``kind`` (INT, FLOAT, STRING, BOOLEAN or a COMBO list);
    ValueError saying what was expected."""
    if isinstance(kind, list) or kind == "STRING":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {type(value).__name__}")
        return value
    if kind not in ("INT", "FLOAT"):
        raise ValueError(f"{kind} inputs take a link [node_id, output_index], not a value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if kind == "INT":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def check_prompt_shape(prompt: Any, library: Any, max_nodes: int) -> None:
    """The prompt-level checks: an object of at most ``max_nodes`` nodes, each with a known class_type."""
    if not isinstance(prompt, dict):
        raise PromptError(
            error(
                "invalid_prompt",
                "Cannot execute because the prompt is not an object of nodes",
                f"expected {{node_id: {{class_type, inputs}}}} (ComfyUI's API format), got {type(prompt).__name__}",
            )
        )
    if len(prompt) > max_nodes:
        raise PromptError(
            error(
                "invalid_prompt",
                f"Cannot execute a prompt of {len(prompt)} nodes; this server runs at most {max_nodes}",
                f"{len(prompt)} nodes",
            )
        )
    for node_id, node in prompt.items():
        where = f"Node ID '#{node_id}'"
        if not isinstance(node, dict):
            raise PromptError(error("invalid_prompt", f"Node '#{node_id}' is not an object", where))
        title = node.get("_meta", {}).get("title") if isinstance(node.get("_meta"), dict) else None
        if "class_type" not in node:
            message = f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be corrupted."
            raise PromptError(
                error("missing_node_type", message, where, node_id=node_id, class_type=None, node_title=title)
            )
        class_type = node["class_type"]
        if library.get(class_type) is None:
            message = f"Node '{title or class_type}' not found. sdtrt runs these node types: {', '.join(library.names)}"
            raise PromptError(
                error("missing_node_type", message, where, node_id=node_id, class_type=class_type, node_title=title)
            )
        strange = [key for key in node if key not in NODE_KEYS]
        if strange or not isinstance(node.get("inputs", {}), dict):
            found = f"keys {strange}" if strange else f"inputs of type {type(node['inputs']).__name__}"
            raise PromptError(
                error("invalid_prompt", f"Node '#{node_id}' has {found}; a node has class_type, inputs, _meta", where)
            )


def validate_prompt(prompt: Any, library: Any, max_nodes: int = 500) -> list[str]:
    """The ids of the output nodes to run, in prompt order; ``PromptError`` when the prompt cannot run."""
    check_prompt_shape(prompt, library, max_nodes)
    outputs = [node_id for node_id, node in prompt.items() if library.get(node["class_type"]).OUTPUT_NODE]
    if not outputs:
        raise PromptError(
            error(
                "prompt_no_outputs",
                "Prompt has no outputs",
                "",
            )
        )
    closures = {o: upstream(prompt, o) for o in outputs}
    needed = [n for n in prompt if any(n in c for c in closures.values())]
    errors = {n: checked_node_errors(n, prompt, library) for n in needed}
    for node_id, members in cycles(prompt, needed).items():
        details = f"nodes {', '.join(members)} depend on each other through their links"
        errors[node_id].append(error("dependency_cycle", "Dependency cycle detected", details, nodes=members))
    report: dict[str, Any] = {}
    for o in outputs:
        for node_id in (n for n in needed if n in closures[o] and errors[n]):
            entry = report.setdefault(
                node_id,
                {"errors": errors[node_id], "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(o)
    if report:
        lines = [
            f"{entry['class_type']} {node_id}: {e['message']}: {e['details']}"
            for node_id, entry in report.items()
            for e in entry["errors"]
        ]
        raise PromptError(
            error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines)), report
        )
    return outputs


def upstream(prompt: dict[str, Any], start: str) -> set[str]:
    """``start`` and every node it depends on through well-formed links."""
    seen, todo = {start}, [start]
    while todo:
        for value in prompt[todo.pop()].get("inputs", {}).values():
            target = link_target(value, prompt) if is_link(value) else None
            if target is not None and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles(prompt: dict[str, Any], nodes: list[str]) -> dict[str, list[str]]:
    """node id -> the nodes of its dependency cycle, for every node of ``nodes`` on one (Kosaraju's SCCs)."""
    edges = {n: [] for n in nodes}
    for n in nodes:
        for value in prompt[n].get("inputs", {}).values():
            target = link_target(value, prompt) if is_link(value) else None
            if target in edges:
                edges[n].append(target)
    order: list[str] = []
    seen: set[str] = set()
    for root in nodes:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(edges[root]))]
        while stack:
            node, it = stack[-1]
            nxt = next((t for t in it if t not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(edges[nxt])))
    reverse: dict[str, list[str]] = {n: [] for n in nodes}
    for n, targets in edges.items():
        for t in targets:
            reverse[t].append(n)
    found: dict[str, list[str]] = {}
    assigned: set[str] = set()
    for root in reversed(order):
        if root in assigned:
            continue
        component, todo = [], [root]
        assigned.add(root)
        while todo:
            node = todo.pop()
            component.append(node)
            for t in reverse[node]:
                if t not in assigned:
                    assigned.add(t)
                    todo.append(t)
        if len(component) > 1 or root in edges[root]:
            members = [n for n in nodes if n in component]
            found.update({n: members for n in members})
    return found


def checked_node_errors(node_id: str, prompt: dict[str, Any], library: Any) -> list[dict[str, Any]]:
    """``node_errors``, or ComfyUI's "exception_during_validation" when checking the node raised (never a 500)."""
    try:
        return node_errors(node_id, prompt, library)
    except Exception as exc:
        log.exception("validating node %s raised", node_id)
        kind = full_type_name(type(exc))
        trace = traceback.format_tb(exc.__traceback__)
        return [
            error(
                "exception_during_validation",
                "Exception when validating node",
                str(exc),
                exception_type=kind,
                traceback=trace,
            )
        ]


def node_errors(node_id: str, prompt: dict[str, Any], library: Any) -> list[dict[str, Any]]:
    """The errors of one node's own inputs (ComfyUI's validate_inputs without the recursion)."""
    node = prompt[node_id]
    cls = library.get(node["class_type"])
    declared = declared_inputs(cls.input_types(library))
    inputs = node.get("inputs", {})
    errors: list[dict[str, Any]] = []
    for name, value in inputs.items():
        if name in declared:
            continue
        allowed = cls.FRONTEND_INPUTS.get(name)
        if allowed is not None and value in allowed:
            continue
        details = f"{name}: {cls.NAME} takes {', '.join(declared)}; remove {name!r}"
        errors.append(error("undeclared_input", "Input not declared by this node", details, input_name=name))
    literals: dict[str, Any] = {}
    for name, (kind, entry) in declared.items():
        config = list(entry)
        if name not in inputs:
            if kind == "required":
                errors.append(error("required_input_missing", "Required input is missing", name, input_name=name))
            continue
        value = inputs[name]
        if is_link(value):
            errors += link_errors(name, value, entry[0], config, prompt, library)
            continue
        found = literal_errors(name, value, entry, config, getattr(cls, "OWN_CHECKS", frozenset()))
        errors += found
        if not found:
            literals[name] = literal_value(entry[0], value)
    for name, message in cls.check(library, literals) if not errors else []:
        errors.append(
            error(
                "custom_validation_failed", "Custom validation failed for node", f"{name} - {message}", input_name=name
            )
        )
    return errors


def link_errors(
    name: str, value: list, wanted: Any, config: list, prompt: dict[str, Any], library: Any
) -> list[dict[str, Any]]:
    """The errors of a linked input: malformed, dangling, out of range, or of another type."""
    bad = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    if len(value) != 2 or not isinstance(value[0], str) or not _index(value[1]):
        details = f'{name}: got {value!r}; write ["node_id", output_index] (a string id, an integer index)'
        return [error("bad_linked_input", bad, details, input_name=name, input_config=config, received_value=value)]
    source, index = value
    if source not in prompt:
        details = f"{name}: links to node {source!r}, which is not in the prompt"
        return [error("bad_linked_input", bad, details, input_name=name, input_config=config, received_value=value)]
    outputs = library.get(prompt[source]["class_type"]).RETURN_TYPES
    if index >= len(outputs):
        details = (
            f"{name}: node {source!r} ({prompt[source]['class_type']}) has {len(outputs)} output(s), not index {index}"
        )
        return [error("bad_linked_input", bad, details, input_name=name, input_config=config, received_value=value)]
    received = outputs[index]
    if received != wanted:
        details = f"{name}, received_type({received}) mismatch input_type({wanted})"
        return [
            error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                details,
                input_name=name,
                input_config=config,
                received_type=received,
                linked_node=value,
            )
        ]
    return []


def literal_errors(name: str, value: Any, entry: tuple, config: list, own: frozenset[str]) -> list[dict[str, Any]]:
    """The errors of a literal input: wrong JSON type, out of range, not one of a COMBO's values."""
    kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
    try:
        converted = literal_value(kind, value)
    except ValueError as exc:
        shown = kind if isinstance(kind, str) else "COMBO"
        return [
            error(
                "invalid_input_type",
                f"Failed to convert an input value to a {shown} value",
                f"{name}, {value!r}, {exc}",
                input_name=name,
                input_config=config,
                received_value=value,
                exception_message=str(exc),
            )
        ]
    if "min" in options and converted < options["min"]:
        message = f"Value {converted} smaller than min of {options['min']}"
        return [
            error("value_smaller_than_min", message, name, input_name=name, input_config=config, received_value=value)
        ]
    if "max" in options and converted > options["max"]:
        message = f"Value {converted} bigger than max of {options['max']}"
        return [
            error("value_bigger_than_max", message, name, input_name=name, input_config=config, received_value=value)
        ]
    if isinstance(kind, list) and name not in own and converted not in kind:
        listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
        shown_config = None if len(kind) > 20 else config
        return [
            error(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{converted}' not in {listed}",
                input_name=name,
                input_config=shown_config,
                received_value=value,
            )
        ]
    return []
