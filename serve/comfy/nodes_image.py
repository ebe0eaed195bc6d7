"""ComfyUI's image file nodes: LoadImage (from the input folder), SaveImage (output) and PreviewImage (temp).

As ComfyUI's nodes.py: LoadImage gives IMAGE [B, H, W, 3] in [0, 1] (EXIF rotation applied, one entry per frame
of the first frame's size) and MASK = 1 - alpha (a 64x64 zero mask without alpha); SaveImage writes
``{prefix}_{counter:05}_.png`` (the counter continues after the highest existing one; the prefix's folder part is a
subfolder; ``%width%``, ``%height%``, ``%year%`` ... are replaced) with the PNG text chunks "prompt" and each key
of the prompt's ``extra_pnginfo`` (the frontend's "workflow"), pixels ``np.clip(255 * x, 0, 255).astype(uint8)``.
Every file name goes through ``ComfyFolders.resolve``: nothing is read or written outside the three folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from .folders import KINDS, UnsafePath
from .node import Node, NodeRun

MAX_LOAD_PIXELS = 4096 * 4096  # per frame: LoadImage's bound on a file in the input folder


def split_annotation(name: str) -> tuple[str, str]:
    """ComfyUI's annotated name "x.png [output]" -> ("x.png", "output"); plain names are in "input"."""
    for kind in KINDS:
        if name.endswith(f" [{kind}]"):
            return name[: -len(kind) - 3], kind
    return name, "input"


def image_path(library: Any, name: str) -> Any:
    """The existing image file ``name`` (maybe "sub/x.png" or annotated) names; ValueError saying why not."""
    if not isinstance(name, str):
        raise ValueError(f"Invalid image file: {name!r}")
    plain, kind = split_annotation(name)
    try:
        path = library.folders.resolve(kind, plain)
    except UnsafePath as exc:
        raise ValueError(f"Invalid image file: {name} ({exc})") from None
    if not path.is_file():
        raise ValueError(f"Invalid image file: {name} (no such file in the {kind} folder; upload it first)")
    return path


def load_frames(path: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE and MASK of an image file, as ComfyUI's LoadImage computes them."""
    with Image.open(path) as img:
        if img.width * img.height > MAX_LOAD_PIXELS:
            raise ValueError(
                f"{path.name} is {img.width}x{img.height}; LoadImage reads at most {MAX_LOAD_PIXELS} pixels"
            )
        images, masks, size = [], [], None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:  # ComfyUI keeps the frames of the first frame's size
                continue
            images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                mask = 1.0 - torch.from_numpy(alpha)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
            masks.append(mask[None])
    return torch.cat(images), torch.cat(masks)


class LoadImage(Node):
    NAME = "LoadImage"
    DISPLAY_NAME = "Load Image"
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    # The frontend's upload button: older frontends send it in the prompt as "upload": "image"
    FRONTEND_INPUTS: ClassVar[dict[str, tuple[Any, ...]]] = {"upload": ("image",)}
    OWN_CHECKS: ClassVar[frozenset[str]] = frozenset({"image"})  # any image in the folders, not only the list

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {"required": {"image": (library.folders.images("input"), {"image_upload": True})}}

    @classmethod
    def check(cls, library: Any, inputs: dict[str, Any]) -> list[tuple[str, str]]:
        if "image" not in inputs:
            return []
        try:
            image_path(library, inputs["image"])
        except ValueError as exc:
            return [("image", str(exc))]
        return []

    @classmethod
    def changed(cls, library: Any, inputs: dict[str, Any]) -> Any:
        try:
            return hashlib.sha256(image_path(library, inputs.get("image")).read_bytes()).hexdigest()
        except (ValueError, OSError):
            return None

    def run(self, run: NodeRun, image: str, upload: str = "image") -> tuple:
        return load_frames(image_path(run, image))


def compute_vars(prefix: str, width: int, height: int) -> str:
    """ComfyUI's filename_prefix variables: %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%."""
    now = time.localtime()
    values = {
        "width": str(width),
        "height": str(height),
        "year": str(now.tm_year),
        "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}",
        "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def split_prefix(prefix: str) -> tuple[str, str]:
    """(subfolder, file name start) of a filename_prefix, as ComfyUI's get_save_image_path splits it."""
    norm = os.path.normpath(prefix.replace("\\", "/")) if prefix else ""
    return os.path.dirname(norm), os.path.basename(norm)


def next_counter(folder: Any, filename: str) -> int:
    """One more than the highest counter of ``{filename}_{counter}_...`` files in ``folder`` (1 when none)."""
    best = 0
    if folder.is_dir():
        for entry in os.listdir(folder):
            head, rest = entry[: len(filename) + 1], entry[len(filename) + 1 :]
            if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
                continue
            try:
                best = max(best, int(rest.split("_")[0]))
            except ValueError:
                best = max(best, 0)
    return best + 1


def png_metadata(run: NodeRun) -> PngInfo:
    """ComfyUI's PNG text chunks: "prompt" and each key of the prompt's extra_pnginfo, as JSON."""
    extra = run.extra_pnginfo or {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra_data.extra_pnginfo must be an object of PNG text chunks, got {type(extra).__name__}")
    info = PngInfo()
    info.add_text("prompt", json.dumps(run.prompt))
    for key, value in extra.items():
        info.add_text(key, json.dumps(value))
    return info


class SaveImage(Node):
    NAME = "SaveImage"
    DISPLAY_NAME = "Save Image"
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    OUTPUT_NODE = True
    KIND = "output"
    COMPRESS_LEVEL = 4

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        tip = (
            "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or "
            "%Empty Latent Image.width% to include values from nodes."
        )
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": tip}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def check(cls, library: Any, inputs: dict[str, Any]) -> list[tuple[str, str]]:
        prefix = inputs.get("filename_prefix")
        if not isinstance(prefix, str):
            return []
        subfolder, filename = split_prefix(compute_vars(prefix, 0, 0))
        try:
            library.folders.resolve(cls.KIND, filename, subfolder)
        except UnsafePath as exc:
            return [("filename_prefix", f"{prefix!r}: {exc}; give a name (optionally sub/name) inside the folder")]
        return []

    def prefix(self, filename_prefix: str) -> str:
        return filename_prefix

    def run(self, run: NodeRun, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> dict:
        prefix = compute_vars(self.prefix(filename_prefix), images.shape[2], images.shape[1])
        subfolder, filename = split_prefix(prefix)
        folder = run.folders.resolve(self.KIND, filename, subfolder).parent
        folder.mkdir(parents=True, exist_ok=True)
        counter = next_counter(folder, filename)
        metadata = png_metadata(run)
        results = []
        for batch_number, image in enumerate(images):
            pixels = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            path = run.folders.resolve(self.KIND, name, subfolder)
            Image.fromarray(pixels).save(path, pnginfo=metadata, compress_level=self.COMPRESS_LEVEL)
            results.append({"filename": name, "subfolder": subfolder, "type": self.KIND})
            counter += 1
        return {"ui": {"images": results}, "result": ()}


class PreviewImage(SaveImage):
    NAME = "PreviewImage"
    DISPLAY_NAME = "Preview Image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    KIND = "temp"
    COMPRESS_LEVEL = 1

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def prefix(self, filename_prefix: str) -> str:
        # ComfyUI's letters, "w" left out as in its source
        return filename_prefix + "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))


IMAGE_NODES = (LoadImage, SaveImage, PreviewImage)
