"""The ControlNet extension's own endpoints (``/controlnet/...``), with the extension's response shapes.

``version``, ``model_list`` (the served artifact's ControlNets), ``module_list`` (the preprocessors this server
has: none and canny), ``control_types``, ``settings`` and ``detect`` (canny or none on posted images). No
annotations future-import: FastAPI reads the handlers' annotations at runtime.
"""

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

from sdtrt.runtime.control.hint import canny_edges, hint_pixels, load_hint_image
from sdtrt.runtime.errors import ControlError, SdtrtError
from sdtrt.runtime.images import png_bytes

from .controlnet import MODULES, RESOLUTION, THRESHOLDS
from .errors import RequestError, ServeError, error_body
from .images import decode_image, encode_png
from .service import Service

API_VERSION = 3  # the extension's ``get_api_version()`` whose unit fields this server reads
DETECT_FIELDS = (
    "controlnet_module", "controlnet_input_images", "controlnet_processor_res", "controlnet_threshold_a",
    "controlnet_threshold_b", "controlnet_masks", "low_vram",
)  # fmt: skip
DETECT_ALIASES = {"controlnet_images": "controlnet_input_images"}  # what the webuiapi client sends


def slider(label: str, value: float, low: float, high: float, step: float) -> dict[str, Any]:
    """One slider as the extension's ``module_detail`` describes it."""
    return {"name": label, "value": value, "min": low, "max": high, "step": step}


def module_list_body() -> dict[str, Any]:
    """``/controlnet/module_list``: names (labels are the same for none and canny) and slider details."""
    resolution = slider("Resolution", RESOLUTION[2], RESOLUTION[0], RESOLUTION[1], 8)
    low, high, low_default, high_default = THRESHOLDS
    detail = {
        "none": {"model_free": False, "sliders": [resolution]},
        "canny": {
            "model_free": False,
            "sliders": [
                resolution,
                slider("Low Threshold", low_default, low, high, 1),
                slider("High Threshold", high_default, low, high, 1),
            ],
        },
    }
    return {"module_list": list(MODULES), "module_detail": detail}


def control_types_body(models: Sequence[str]) -> dict[str, Any]:
    """``/controlnet/control_types``: "All" and "Canny" with the extension's filtering and default choices."""
    every = ["None", *models]
    canny = ["None", *(m for m in models if "canny" in m.lower())]
    default = next((m for m in canny[1:] if "11" in m.split("[")[0]), canny[1] if len(canny) > 1 else "None")
    return {
        "control_types": {
            "All": {"module_list": list(MODULES), "model_list": every, "default_option": "none",
                    "default_model": "None"},
            "Canny": {"module_list": list(MODULES), "model_list": canny, "default_option": "canny",
                      "default_model": default},
        }
    }  # fmt: skip


def detect_body(payload: Any) -> dict[str, Any]:
    """``POST /controlnet/detect``: each input image preprocessed (A1111's canny, or unchanged for none) as
    base64 PNGs: {"images": [...], "info": "Success"}; ``RequestError`` naming the field otherwise."""
    values = _detect_fields(payload)
    module = values.get("controlnet_module", "none")
    if not isinstance(module, str) or module.strip().lower() not in MODULES:
        raise RequestError(
            f"controlnet_module {module!r:.60} is not available: this server has {', '.join(MODULES)} (other "
            "detectors need downloaded weights)"
        )
    module = module.strip().lower()
    images = values.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images:
        raise RequestError("controlnet_input_images must be a non-empty list of base64 images (no image selected)")
    if values.get("controlnet_masks"):
        raise RequestError("controlnet_masks is not supported: none and canny take no mask; leave it out")
    if not isinstance(values.get("low_vram", False), bool):
        raise RequestError(f"low_vram must be true or false, got {values['low_vram']!r:.60}")
    res = int(_detect_slider(values, "controlnet_processor_res", RESOLUTION[2], RESOLUTION[0], RESOLUTION[1]))
    low = int(_detect_slider(values, "controlnet_threshold_a", THRESHOLDS[2], THRESHOLDS[0], THRESHOLDS[1]))
    high = int(_detect_slider(values, "controlnet_threshold_b", THRESHOLDS[3], THRESHOLDS[0], THRESHOLDS[1]))
    low, high = sorted((low, high))  # cv2.Canny swaps them too
    out = []
    for k, text in enumerate(images):
        where = f"controlnet_input_images[{k}]"
        try:
            rgb = hint_pixels(load_hint_image(decode_image(text, where)))
        except ControlError as exc:
            raise RequestError(f"{where} cannot be used: {exc}") from None
        result = canny_edges(rgb, low, high, res) if module == "canny" else rgb
        out.append(encode_png(png_bytes(_to_pil(result))))
    return {"images": out, "info": "Success"}


def _detect_fields(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(payload).__name__}")
    values = dict(payload)
    for alias, name in DETECT_ALIASES.items():
        if alias in values:
            if name in values:
                raise RequestError(f"give {name!r} or {alias!r}, not both")
            values[name] = values.pop(alias)
    unknown = sorted(set(values) - set(DETECT_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; /controlnet/detect takes "
                           f"{', '.join(DETECT_FIELDS)}")  # fmt: skip
    return values


def _detect_slider(values: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = values.get(name, -1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r:.60}")
    if value == -1:
        return default
    if not low <= value <= high:
        raise RequestError(f"{name} must be from {low:g} to {high:g} (or -1 for {default:g}), got {value:g}")
    return value


def _to_pil(rgb: Any) -> Any:
    from PIL import Image

    return Image.fromarray(rgb, mode="RGB")


def add_controlnet_routes(app: Any, service: Service) -> None:
    """Mount the extension's ``/controlnet/...`` endpoints on a FastAPI ``app`` over ``service``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.get("/controlnet/version")
    async def version() -> Any:
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    async def model_list(update: bool = True) -> Any:  # ``update``: the artifact's list never changes
        return {"model_list": list(app.state.checkpoints.current.controlnets)}

    @app.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False) -> Any:  # none and canny are their own labels
        return module_list_body()

    @app.get("/controlnet/control_types")
    async def control_types() -> Any:
        return control_types_body(app.state.checkpoints.current.controlnets)

    @app.get("/controlnet/settings")
    async def settings() -> Any:
        return {"control_net_unit_count": len(app.state.checkpoints.current.controlnets)}

    @app.post("/controlnet/detect")
    async def detect(request: Request) -> Any:
        try:
            try:
                payload = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from None
            body = await asyncio.to_thread(detect_body, payload)
        except ServeError as exc:
            return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status)
        except SdtrtError as exc:  # e.g. opencv missing on the server: the client's request was fine
            return JSONResponse(error_body(ServeError.kind, str(exc)), status_code=ServeError.status)
        return JSONResponse(body)


__all__ = ["add_controlnet_routes", "control_types_body", "detect_body", "module_list_body"]
