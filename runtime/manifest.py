"""``manifest.json``: the contract between export, engine builds and the runtime.

An artifact folder holds one ONNX file (or engine) per component, the tokenizer, the scheduler config and this
manifest. The runtime trusts nothing in the folder that the manifest does not describe.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.runtime.errors import ArtifactError
from sdtrt.runtime.files import write_text_atomic
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import CONTROLNET_PREFIX, ModelInfo

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# What a folder holds: ONNX files (`sdtrt export`, `sdtrt calibrate`), TensorRT engines (`sdtrt build`), or no
# networks at all, only what the torch backend needs to rerun the source model (`write_source_artifact`).
KINDS = ("onnx", "tensorrt", "torch")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[str | int, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorEntry:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class ComponentEntry:
    """One exported network: its file, integrity hash, interface and the shapes it accepts."""

    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    shapes: dict[str, dict[str, list[int]]]  # input -> {"min": [...], "opt": [...], "max": [...]}
    opset: int | None = None
    data_file: str | None = None
    data_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ArtifactError(f"component precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in (self.file, self.data_file):
            if name is not None:
                check_relative_name(name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentEntry:
        data = dict(data)
        data["inputs"] = tuple(TensorEntry.from_dict(t) for t in data["inputs"])
        data["outputs"] = tuple(TensorEntry.from_dict(t) for t in data["outputs"])
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    """An artifact folder's description; ``kind`` is one of ``KINDS`` and says which backends can run it."""

    model: ModelInfo
    profile: ShapeProfile
    components: dict[str, ComponentEntry]
    source: dict[str, Any]
    versions: dict[str, str | None]
    tokenizer: str = "tokenizer.json"
    scheduler: str = "scheduler_config.json"
    kind: str = "onnx"  # "onnx" for export artifacts, "tensorrt" for engine folders, "torch" for source folders
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    tokenizer_2: str | None = None  # SDXL's second tokenizer (pads with "!")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ArtifactError(
                f"manifest kind must be one of {', '.join(KINDS)}, got {self.kind!r}; re-export the artifact"
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["profile_id"] = self.profile.id
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema version {version!r} is not supported: this sdtrt reads version "
                f"{SCHEMA_VERSION}. Re-export the artifact with this version of sdtrt"
            )
        data = dict(data)
        data.pop("profile_id", None)
        data["model"] = ModelInfo(**data["model"])
        data["profile"] = ShapeProfile.from_dict(data["profile"])
        data["components"] = {k: ComponentEntry.from_dict(v) for k, v in data["components"].items()}
        return cls(**data)

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / MANIFEST_NAME
        write_text_atomic(path, self.to_json())
        return path

    @property
    def precision(self) -> str:
        """The artifact's precision: its UNet's (SDXL fp16 artifacts may keep the VAE in fp32)."""
        entry = self.components.get("unet") or next(iter(self.components.values()))
        return entry.precision

    @property
    def controlnets(self) -> dict[str, str]:
        """The artifact's ControlNets: name -> component (``controlnet_<name>``), sorted by name."""
        prefix = CONTROLNET_PREFIX
        return {c[len(prefix) :]: c for c in sorted(self.components) if c.startswith(prefix)}

    def controlnet_families(self) -> dict[str, str]:
        """The model family each ControlNet was made for, as its export recorded it."""
        return {
            name: str(self.components[c].extra.get("controlnet", {}).get("family", ""))
            for name, c in self.controlnets.items()
        }

    def component(self, name: str) -> ComponentEntry:
        if name not in self.components:
            why = ""
            if name == "vae_encoder" and self.model.inpainting:
                why = " (an inpainting model encodes the masked image on every call)"
            raise ArtifactError(
                f"this artifact has no {name!r} component{why} (it has {sorted(self.components)}); "
                f"export it with --components {name}"
            )
        return self.components[name]


def check_relative_name(name: str) -> None:
    """Refuse file names that could point outside the artifact folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or ":" in name:
        raise ArtifactError(
            f"artifact file name {name!r} is not a plain relative name inside the folder; "
            "refusing to read outside the artifact (re-export the artifact)"
        )


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/manifest.json``."""
    root = Path(folder)
    if not root.exists():
        raise ArtifactError(f"artifact folder {str(root)!r} does not exist; run `sdtrt export` to create one")
    if not root.is_dir():
        raise ArtifactError(f"expected an artifact folder, found a file at {str(root)!r}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{str(root)!r} has no {MANIFEST_NAME}: it is not an sdtrt artifact folder "
            "(or its export did not finish); run `sdtrt export` again"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{str(path)!r} is not valid JSON ({exc}); re-export the artifact") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{str(path)!r} must hold a JSON object, found {type(data).__name__}")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{str(path)!r} is incomplete or malformed ({exc!r}); re-export the artifact") from exc


def resolve_file(folder: str | os.PathLike[str], name: str) -> Path:
    """Path of an artifact file, refusing names or symlinks that lead outside ``folder``."""
    check_relative_name(name)
    root = Path(folder).resolve()
    path = Path(folder) / name
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise ArtifactError(f"artifact file {name!r} is a link or leads outside {str(root)!r}; refusing it")
    if not path.is_file():
        raise ArtifactError(f"artifact file {str(path)!r} is missing; re-export the artifact")
    return path


def model_display_name(manifest: Manifest, fallback: str = "") -> str:
    """The model's name for people and image metadata ("Model: ..."): a preset's name, a diffusers folder's name,
    a checkpoint file's stem; ``fallback`` (e.g. the artifact folder's name) when the source names none.

    The artifact folder is often called ``artifacts`` or ``out``, which says nothing about the model in it.
    """
    source = manifest.source
    kind, path = source.get("kind"), str(source.get("path") or "")
    if kind == "preset" and source.get("name"):
        return str(source["name"])
    if kind == "diffusers" and path:
        return Path(path).name
    if kind == "single_file" and path:
        return Path(path).stem
    return str(source.get("name") or fallback)
