"""The workflow templates the web frontend offers (its templates browser, opened on a first visit): workflows this
server runs, on its current model.

The frontend's own default workflow needs nodes sdtrt does not have (another model family's loaders), and
ComfyUI's template library ships in a package of its own, for models sdtrt does not serve. So the templates here
are sdtrt's: ComfyUI's classic text-to-image workflow and a two-pass (hires) variant, in the frontend's workflow
format, with the current model as ``ckpt_name`` and its engines' preferred size (``opt_width``/``opt_height`` of
its shape profile). ``/templates/index.json`` lists them, ``/templates/{name}.json`` is one, and
``/templates/{name}-1.svg`` its thumbnail (the chain of nodes, drawn).
"""

from __future__ import annotations

from html import escape
from typing import Any

from sdtrt.runtime.manifest import read_manifest

TITLES = {
    "sdtrt-txt2img": ("Text to image", "ComfyUI's default workflow: checkpoint, prompts, KSampler, VAE decode, save."),
    "sdtrt-hires": ("Text to image, two passes", "A first KSampler pass, the latent upscaled 1.5x, a second pass at "
                    "denoise 0.5 (hires fix)."),
}  # fmt: skip
HEIGHT = 280  # of a thumbnail (320 wide)
CHAINS = {
    "sdtrt-txt2img": ("Load Checkpoint", "CLIP Text Encode", "KSampler", "VAE Decode", "Save Image"),
    "sdtrt-hires": ("Load Checkpoint", "KSampler", "Upscale Latent By", "KSampler", "VAE Decode", "Save Image"),
}


def templates_index() -> list[dict[str, Any]]:
    """``/templates/index.json``: one module of sdtrt's templates, in the frontend's ``WorkflowTemplates`` form."""
    templates = [
        {"name": name, "title": title, "description": text, "mediaType": "image", "mediaSubtype": "svg",
         "tags": ["Text to Image"], "openSource": True}
        for name, (title, text) in TITLES.items()
    ]  # fmt: skip
    return [{"moduleName": "default", "title": "sdtrt", "type": "image", "category": "sdtrt", "templates": templates}]


def model_size(folder: str) -> tuple[int, int]:
    """(width, height) the model's engines are built for best (its shape profile's optimum)."""
    profile = read_manifest(folder).profile
    return profile.opt_width, profile.opt_height


def _node(id_: int, type_: str, pos: tuple[int, int], inputs: list, outputs: list, widgets: list) -> dict[str, Any]:
    """A node of the frontend's workflow format; ``inputs``: (name, type, link id), ``outputs``: (name, type, links)."""
    return {
        "id": id_, "type": type_, "pos": list(pos), "size": [320, 130], "flags": {}, "order": id_, "mode": 0,
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": n, "type": t, "links": links, "slot_index": i} for i, (n, t, links) in enumerate(outputs)],
        "properties": {"Node name for S&R": type_}, "widgets_values": widgets,
    }  # fmt: skip


def template_workflow(name: str, ckpt_name: str, width: int, height: int) -> dict[str, Any] | None:
    """Template ``name`` on ``ckpt_name`` at ``width`` x ``height``, or None for an unknown name."""
    if name not in TITLES:
        return None
    hires = name == "sdtrt-hires"
    decode_from = 12 if hires else 3  # the KSampler whose latent VAEDecode reads
    nodes = [
        _node(4, "CheckpointLoaderSimple", (20, 180), [],
              [("MODEL", "MODEL", [1] + ([11] if hires else [])), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])],
              [ckpt_name]),
        _node(6, "CLIPTextEncode", (400, 40), [("clip", "CLIP", 3)],
              [("CONDITIONING", "CONDITIONING", [4] + ([12] if hires else []))],
              ["a photograph of a lighthouse on a cliff at sunset, detailed, warm light"]),
        _node(7, "CLIPTextEncode", (400, 260), [("clip", "CLIP", 5)],
              [("CONDITIONING", "CONDITIONING", [6] + ([13] if hires else []))], ["blurry, low quality, watermark"]),
        _node(5, "EmptyLatentImage", (400, 480), [], [("LATENT", "LATENT", [2])], [width, height, 1]),
        _node(3, "KSampler", (800, 120),
              [("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
               ("latent_image", "LATENT", 2)],
              [("LATENT", "LATENT", [10 if hires else 7])], [0, "randomize", 20, 7.0, "euler", "normal", 1.0]),
        _node(8, "VAEDecode", (1560 if hires else 1180, 120), [("samples", "LATENT", 7), ("vae", "VAE", 8)],
              [("IMAGE", "IMAGE", [9])], []),
        _node(9, "SaveImage", (1560 if hires else 1180, 280), [("images", "IMAGE", 9)], [], ["sdtrt"]),
    ]  # fmt: skip
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
             [7, decode_from, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]  # fmt: skip
    if hires:
        nodes += [
            _node(10, "LatentUpscaleBy", (1180, 60), [("samples", "LATENT", 10)], [("LATENT", "LATENT", [14])],
                  ["nearest-exact", 1.5]),
            _node(12, "KSampler", (1180, 220),
                  [("model", "MODEL", 11), ("positive", "CONDITIONING", 12), ("negative", "CONDITIONING", 13),
                   ("latent_image", "LATENT", 14)],
                  [("LATENT", "LATENT", [7])], [0, "randomize", 12, 7.0, "euler", "normal", 0.5]),
        ]  # fmt: skip
        links += [[10, 3, 0, 10, 0, "LATENT"], [11, 4, 0, 12, 0, "MODEL"], [12, 6, 0, 12, 1, "CONDITIONING"],
                  [13, 7, 0, 12, 2, "CONDITIONING"], [14, 10, 0, 12, 3, "LATENT"]]  # fmt: skip
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max(link[0] for link in links),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}  # fmt: skip


def template_thumbnail(name: str) -> str | None:
    """An SVG of template ``name``'s chain of nodes, or None for an unknown name."""
    chain = CHAINS.get(name)
    if chain is None:
        return None
    step = (HEIGHT - 20) / len(chain)  # every thumbnail the same size, its boxes spread over it
    boxes = []
    for i, label in enumerate(chain):
        y = round(10 + i * step + (step - 30) / 2)
        boxes.append(f'<rect x="60" y="{y}" width="200" height="30" rx="6" fill="#353535" stroke="#7a7a7a"/>'
                     f'<text x="160" y="{y + 20}" text-anchor="middle" font-family="sans-serif" font-size="13" '
                     f'fill="#e0e0e0">{escape(label)}</text>')  # fmt: skip
        if i:
            top = round(10 + (i - 1) * step + (step - 30) / 2) + 30
            boxes.append(f'<line x1="160" y1="{top}" x2="160" y2="{y}" stroke="#9acd32" stroke-width="2"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="320" height="{HEIGHT}" viewBox="0 0 320 {HEIGHT}">'
            f'<rect width="320" height="{HEIGHT}" fill="#202020"/>{"".join(boxes)}</svg>')  # fmt: skip
