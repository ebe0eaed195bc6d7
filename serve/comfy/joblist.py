"""ComfyUI's jobs API (``GET /api/jobs``, ``/api/jobs/{id}``): the queue and the history as one list of jobs.

The web frontend reads its queue and history panels from it (not from ``/queue`` and ``/history``). A job is
built from ComfyUI's queue items (``[number, prompt_id, prompt, extra_data, outputs_to_execute]``) and history
entries (``{"prompt", "outputs", "status"}``), as ComfyUI's ``comfy_execution/jobs.py`` defines them: status
``pending``/``in_progress`` from the queue, ``completed``/``failed``/``cancelled`` from the history (an
interrupted prompt is cancelled), times from the history's status messages, the first image output as the
preview. ``jobs_page`` and ``job_detail`` are plain functions over those shapes; ``add_job_routes`` serves them
from a snapshot callable.
"""

from collections.abc import Callable, Sequence
from typing import Any

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
SORTS = ("created_at", "execution_duration")
PREVIEWABLE = ("images", "video", "audio")
END_EVENTS = {"execution_success": "completed", "execution_error": "failed", "execution_interrupted": "cancelled"}

# (running queue items, pending queue items, history by prompt id), as the protocol's /queue and /history hold them
Snapshot = tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]], dict[str, dict[str, Any]]]


class JobsQueryError(ValueError):
    """A jobs query parameter that is not one ComfyUI accepts."""


def _pruned(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _metadata(extra_data: Any) -> tuple[Any, Any]:
    extra = extra_data if isinstance(extra_data, dict) else {}
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow") or {}
    return extra.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def queue_job(item: Sequence[Any], status: str) -> dict[str, Any]:
    """A queue item (``[number, prompt_id, prompt, extra_data, outputs]``) as a job of ``status``."""
    create_time, workflow_id = _metadata(item[3])
    values = {"id": item[1], "status": status, "priority": item[0], "create_time": create_time}
    return _pruned({**values, "outputs_count": 0, "workflow_id": workflow_id})


def outputs_summary(outputs: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """How many output files the nodes produced, and the one to preview (an ``output`` image first)."""
    count, preview, fallback = 0, None, None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if preview is None and media in PREVIEWABLE:
                    found = {**item, "nodeId": node_id, "mediaType": media}
                    if item.get("type") == "output":
                        preview = found
                    elif fallback is None:
                        fallback = found
    return count, preview or fallback


def history_job(prompt_id: str, entry: dict[str, Any], detail: bool = False) -> dict[str, Any]:
    """A history entry as a job; ``detail`` adds its outputs, status and workflow (``/api/jobs/{id}``)."""
    number, _, prompt, extra_data, _ = entry["prompt"][:5]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    status = "failed" if status_info.get("status_str") == "error" else "completed"
    start = end = error = None
    for message in status_info.get("messages") or []:
        if not (isinstance(message, list | tuple) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in END_EVENTS:
            end, status = data.get("timestamp"), END_EVENTS[event]
            error = data if event == "execution_error" else None
    outputs = entry.get("outputs") or {}
    count, preview = outputs_summary(outputs)
    job = _pruned({
        "id": prompt_id, "status": status, "priority": number, "create_time": create_time,
        "execution_start_time": start, "execution_end_time": end, "execution_error": error,
        "outputs_count": count, "preview_output": preview, "workflow_id": workflow_id,
    })  # fmt: skip
    if detail:
        job |= {"outputs": outputs, "execution_status": status_info}
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _sort_key(sort_by: str) -> Callable[[dict[str, Any]], float]:
    if sort_by == "execution_duration":
        return lambda job: (job.get("execution_end_time") or 0) - (job.get("execution_start_time") or 0)
    return lambda job: job.get("create_time") or 0


def jobs_page(snapshot: Snapshot, query: dict[str, str]) -> dict[str, Any]:
    """``GET /api/jobs``'s body for ``query`` (status=a,b workflow_id sort_by sort_order limit offset);
    ``JobsQueryError`` for a value ComfyUI refuses."""
    running, pending, history = snapshot
    wanted = [s.strip().lower() for s in (query.get("status") or ",".join(STATUSES)).split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown:
        raise JobsQueryError(f"status {', '.join(unknown)} is not one of {', '.join(STATUSES)}")
    sort_by, order = query.get("sort_by", "created_at").lower(), query.get("sort_order", "desc").lower()
    if sort_by not in SORTS or order not in ("asc", "desc"):
        raise JobsQueryError("sort_by must be created_at or execution_duration, sort_order asc or desc")
    try:
        limit = int(query["limit"]) if "limit" in query else None
        offset = max(0, int(query.get("offset", "0")))
    except ValueError:
        raise JobsQueryError("limit and offset must be integers") from None
    if limit is not None and limit <= 0:
        raise JobsQueryError(f"limit must be a positive integer, got {limit}")
    # the queue and the history are read one after the other: a prompt that finished in between is in both
    jobs = [queue_job(item, "in_progress") for item in running if item[1] not in history]
    jobs += [queue_job(item, "pending") for item in pending if item[1] not in history]
    jobs += [history_job(prompt_id, entry) for prompt_id, entry in history.items()]
    jobs = [job for job in jobs if job["status"] in wanted]
    if query.get("workflow_id"):
        jobs = [job for job in jobs if job.get("workflow_id") == query["workflow_id"]]
    jobs.sort(key=_sort_key(sort_by), reverse=order == "desc")
    total = len(jobs)
    page = jobs[offset:][:limit] if limit is not None else jobs[offset:]
    pagination = {"offset": offset, "limit": limit if limit is not None else total, "total": total}
    return {"jobs": page, "pagination": pagination | {"has_more": offset + len(page) < total}}


def job_detail(snapshot: Snapshot, prompt_id: str) -> dict[str, Any] | None:
    """``GET /api/jobs/{id}``'s body, or None for an unknown id."""
    running, pending, history = snapshot
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], detail=True)
    for items, status in ((running, "in_progress"), (pending, "pending")):
        for item in items:
            if item[1] == prompt_id:
                return queue_job(item, status)
    return None


def job_status(snapshot: Snapshot, prompt_id: str) -> str | None:
    """The status of job ``prompt_id`` (None if unknown)."""
    job = job_detail(snapshot, prompt_id)
    return None if job is None else job["status"]


def add_job_routes(app: Any, snapshot: Callable[[], Snapshot], cancel: Callable[[str], bool]) -> None:
    """``GET /api/jobs``, ``GET /api/jobs/{id}`` over ``snapshot()`` (the running and pending queue items and the
    history, in ComfyUI's shapes), and ``POST /api/jobs/{id}/cancel`` and ``POST /api/jobs/cancel``
    (``{"job_ids": [...]}``) over ``cancel(id)`` (a pending job leaves the queue, a running one stops between two
    steps; True if one did); each also without ``/api``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from ..errors import error_body

    def cancel_one(prompt_id: str) -> dict[str, Any] | None:
        status = job_status(snapshot(), prompt_id)
        if status is None:
            return None
        stopped = status in ("pending", "in_progress") and cancel(prompt_id)
        return {"id": prompt_id, "status": status, "cancelled": bool(stopped)}  # status: before the cancel

    def unknown(prompt_id: str) -> Any:
        return JSONResponse(error_body("not_found", f"no job {prompt_id!r}"), status_code=404)

    for prefix in ("", "/api"):

        @app.get(prefix + "/jobs")
        async def list_jobs(request: Request) -> Any:
            try:
                return jobs_page(snapshot(), dict(request.query_params))
            except JobsQueryError as exc:
                return JSONResponse(error_body("bad_request", str(exc)), status_code=400)

        @app.get(prefix + "/jobs/{prompt_id}")
        async def get_job(prompt_id: str) -> Any:
            job = job_detail(snapshot(), prompt_id)
            return unknown(prompt_id) if job is None else job

        @app.post(prefix + "/jobs/cancel")
        async def cancel_jobs(request: Request) -> Any:
            try:
                body = await request.json()
            except ValueError:
                body = None
            ids = body.get("job_ids") if isinstance(body, dict) else None
            if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                message = 'POST /jobs/cancel takes {"job_ids": [job id, ...]}'
                return JSONResponse(error_body("bad_request", message), status_code=400)
            return {"jobs": [cancel_one(i) or {"id": i, "status": None, "cancelled": False} for i in ids]}

        @app.post(prefix + "/jobs/{prompt_id}/cancel")
        async def cancel_job(prompt_id: str) -> Any:
            result = cancel_one(prompt_id)
            return unknown(prompt_id) if result is None else result
