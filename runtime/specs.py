"""The networks of a Stable Diffusion model, described once, as data.

Exporter, engine builders and runtime all read these descriptions: tensor names, dtypes and symbolic shapes,
and how a :class:`~sdtrt.runtime.profile.ShapeProfile` maps to concrete min/opt/max shapes.

Symbolic dimensions (resolved by :func:`dim_ranges`):
    batch          images per call
    text_batch     text encoder rows: prompts and negative prompts, one row per 77-token window
    unet_batch     UNet rows: 2 x batch with classifier-free guidance, batch without it
    height, width  image size in pixels
    latent_height, latent_width   image size / vae_scale_factor
    text_length    77 x number of prompt windows

SDXL has two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG): both give their penultimate hidden states, which
the runtime concatenates along the channel axis into the UNet's context; the second also gives its projected
pooled output (``text_embeds``), which the UNet takes with six micro-conditioning ``time_ids`` (original size,
crop top-left, target size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sdtrt.runtime.errors import ShapeError
from sdtrt.runtime.profile import ShapeProfile

TEXT_WINDOW = 77
FLOAT = "float"  # placeholder dtype: float32 or float16, by the component's precision

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ModelInfo:
    """The numbers of a model family that export and runtime need."""

    family: str = "sd1"
    latent_channels: int = 4
    vae_scale_factor: int = 8
    scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"
    text_width: int = 768
    pooled_width: int = 768
    unet_downsamples: int = 3
    # SDXL only: width of the pooled text embedding and number of micro-conditioning time ids.
    add_text_embeds_width: int = 0
    add_time_ids: int = 0
    upcast_vae: bool = False
    # SDXL only: width of the second text encoder (the UNet context is text_width + text_width_2 wide), and
    # whether the negative conditioning is zeros when no negative prompt is given (the model's own setting).
    text_width_2: int = 0
    force_zeros_for_empty_prompt: bool = False
    # The image side the model was trained at (UNet sample size x VAE factor); 0 when unknown.
    native_size: int = 0
    # The ControlNet residuals the exported UNet adds, in the order ControlNets give them: (channels, latent
    # downscale) of each down-block output, then the middle block's. Empty: the UNet takes no ControlNet inputs.
    control_residuals: tuple[tuple[int, int], ...] = ()
    # Step caching (see runtime.models.step_cache): the skip branch the ``unet_shallow`` component was cut at
    # (-1: none exported) and the (channels, latent downscale) of the feature the full UNet gives it.
    cache_branch: int = -1
    cache_feature: tuple[int, ...] = ()
    cache_context: bool = True  # whether the shallow UNet reads the text context (has cross-attention)
    # SD 1.x/2.x: the text encoder's transformer layers when it was exported with the ``clip_skip`` input (clip
    # skip 1..text_layers chosen per call); 0: exported without it (older artifacts, SDXL), clip skip 1 only.
    text_layers: int = 0
    # The UNet's input channels: latent_channels for a regular model; 2 x latent_channels + 1 for an inpainting
    # model (latents, the mask, the masked image's latents). 0 (manifests that predate it) means latent_channels.
    unet_in_channels: int = 0

    def __post_init__(self) -> None:
        # JSON gives lists; keep the frozen dataclass hashable and comparable
        object.__setattr__(self, "control_residuals", tuple((int(c), int(f)) for c, f in self.control_residuals))
        object.__setattr__(self, "cache_feature", tuple(int(v) for v in self.cache_feature))
        if self.cache_branch >= 0 and len(self.cache_feature) != 2:
            raise ShapeError(f"a step-cache model needs cache_feature (channels, downscale), got {self.cache_feature}")
        if self.family not in FAMILIES:
            raise ShapeError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ShapeError(f"prediction type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        for name in ("latent_channels", "vae_scale_factor", "text_width"):
            if getattr(self, name) < 1:
                raise ShapeError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_unet_in_channels()
        if self.text_layers < 0 or (self.text_layers and self.family == "sdxl"):
            raise ShapeError(f"text_layers must be >= 0 (0 for SDXL), got {self.text_layers} for {self.family}")
        if self.family == "sdxl":
            for name in ("text_width_2", "add_text_embeds_width", "add_time_ids"):
                if getattr(self, name) < 1:
                    raise ShapeError(f"an SDXL model needs {name} >= 1, got {getattr(self, name)}")

    def _check_unet_in_channels(self) -> None:
        # 0 stands for "same as the latents", so old manifests and new ones of the same model compare equal
        if self.unet_in_channels == 0:
            object.__setattr__(self, "unet_in_channels", self.latent_channels)
        c = self.latent_channels
        if self.unet_in_channels not in (c, 2 * c + 1):
            raise ShapeError(
                f"the UNet takes {self.unet_in_channels} input channels but the latents have {c}: expected {c} "
                f"(a regular model) or {2 * c + 1} (an inpainting model: latents, mask, masked-image latents); "
                "the UNet and the VAE come from different models"
            )

    @property
    def inpainting(self) -> bool:
        """Whether the UNet is an inpainting UNet: its input is the latents, a mask channel and the masked image's
        latents (``2 * latent_channels + 1`` channels), so every call feeds it a mask condition made with the VAE
        encoder."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def condition_channels(self) -> int:
        """Channels an inpainting UNet takes after the latents (mask, masked-image latents); 0 for other models."""
        return self.unet_in_channels - self.latent_channels

    @property
    def vae_needs_fp32(self) -> bool:
        """SDXL's VAE overflows in fp16 unless its config says otherwise (``force_upcast``), as diffusers treats it."""
        return self.family == "sdxl" and self.upcast_vae

    @property
    def context_width(self) -> int:
        """Width of the UNet's ``encoder_hidden_states``: the text encoders' widths together."""
        return self.text_width + self.text_width_2

    @property
    def text_output(self) -> str:
        """The text encoders' per-token output: SDXL conditions on the penultimate layer, SD 1.x/2.x on the last."""
        return "penultimate_hidden_state" if self.family == "sdxl" else "last_hidden_state"

    @property
    def clip_skip_ready(self) -> bool:
        """Whether the text encoder takes ``clip_skip`` (which hidden state, counted from the last, it gives)."""
        return self.text_layers > 0

    @property
    def control_ready(self) -> bool:
        """Whether the UNet takes ControlNet residuals as inputs (artifacts exported without them do not)."""
        return bool(self.control_residuals)

    @property
    def step_cache(self) -> bool:
        """Whether the artifact has the shallow UNet (``unet_shallow``) and the full UNet gives its feature."""
        return self.cache_branch >= 0

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this so every UNet downsample divides evenly."""
        return self.vae_scale_factor * (2**self.unet_downsamples)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (by precision), "float32", "int32", "int64"
    shape: tuple[str | int, ...]

    def concrete_dtype(self, precision: str) -> str:
        if self.dtype != FLOAT:
            return self.dtype
        return "float16" if precision == "fp16" else "float32"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    # Inputs that stay float32 even in an fp16 graph (e.g. the timestep, whose sinusoid needs fp32).
    fp32_inputs: tuple[str, ...] = field(default=())

    @property
    def file_name(self) -> str:
        return f"{self.name}.onnx"

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_shallow", "vae_decoder", "vae_encoder")
DEFAULT_CACHE_BRANCH = 0  # the skip branch exported by default, chosen by measurement (benchmarks/RESULTS.md)
CACHE_FEATURE = "cache_feature"  # the full UNet's extra output and the shallow UNet's extra input
# ControlNets are components too, one per ControlNet, named ``controlnet_<name>`` in a manifest.
CONTROLNET_PREFIX = "controlnet_"
CONTROL_MID = "control_mid"
CLIP_SKIP = "clip_skip"  # the text encoder's input choosing its hidden state: 1 the last layer's, 2 the one before


def control_input_names(model: ModelInfo) -> tuple[str, ...]:
    """The UNet's ControlNet inputs (and a ControlNet's outputs), in order: ``control_down_<k>``, then the middle
    block's ``control_mid``; empty for a UNet that takes no residuals."""
    count = len(model.control_residuals)
    return (*(f"control_down_{k}" for k in range(count - 1)), CONTROL_MID) if count else ()


def residual_layout(
    block_out_channels: Sequence[int], layers_per_block: int | Sequence[int], down_blocks: int | None = None
) -> tuple[tuple[int, int], ...]:
    """(channels, latent downscale) of each residual a ControlNet adds to a diffusers UNet of this shape.

    One per down-block output: the input convolution, every resnet of every down block, every downsampler
    (all blocks but the last have one); then the middle block. 12 + 1 for SD 1.x/2.x, 9 + 1 for SDXL.
    """
    channels = list(block_out_channels)
    blocks = down_blocks if down_blocks is not None else len(channels)
    layers = [layers_per_block] * blocks if isinstance(layers_per_block, int) else list(layers_per_block)
    layout = [(channels[0], 1)]
    for i in range(blocks):
        layout += [(channels[i], 2**i)] * int(layers[i])
        if i < blocks - 1:
            layout.append((channels[i], 2 ** (i + 1)))
    layout.append((channels[blocks - 1], 2 ** (blocks - 1)))
    return tuple(layout)


def controlnet_component(name: str) -> str:
    """The manifest component that holds the ControlNet called ``name``."""
    return f"{CONTROLNET_PREFIX}{name}"


def is_controlnet(component: str) -> bool:
    return component.startswith(CONTROLNET_PREFIX)


def model_components(model: ModelInfo) -> tuple[str, ...]:
    """The components this model has, in pipeline order (``text_encoder_2`` is SDXL's only, ``unet_shallow`` a
    step-cache model's)."""
    absent = {"text_encoder_2": model.family != "sdxl", "unet_shallow": not model.step_cache}
    return tuple(c for c in COMPONENTS if not absent.get(c, False))


def required_components(model: ModelInfo) -> tuple[str, ...]:
    """What every call needs: the text encoders, the UNet and the VAE decoder; an inpainting model also the VAE
    encoder (its UNet always takes the masked image's latents)."""
    optional = ("unet_shallow",) if model.inpainting else ("vae_encoder", "unet_shallow")
    return tuple(c for c in model_components(model) if c not in optional)


def component_specs(model: ModelInfo) -> dict[str, ComponentSpec]:
    """The components of ``model``, keyed by name, in pipeline order."""
    specs = {**_text_encoder_specs(model), **_unet_specs(model), **_vae_specs(model)}
    return {name: specs[name] for name in model_components(model)}


def _text_encoder_specs(model: ModelInfo) -> dict[str, ComponentSpec]:
    ids = (TensorSpec("input_ids", "int32", ("text_batch", TEXT_WINDOW)),)
    skip = (TensorSpec(CLIP_SKIP, "int32", (1,)),) if model.clip_skip_ready else ()
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(*ids, *skip),
            outputs=(
                TensorSpec(model.text_output, FLOAT, ("text_batch", TEXT_WINDOW, model.text_width)),
                TensorSpec("pooled_output", FLOAT, ("text_batch", model.pooled_width)),
            ),
            description="CLIP text encoder: token ids (and clip skip) -> one vector per token",
        ),
        "text_encoder_2": ComponentSpec(
            "text_encoder_2",
            inputs=ids,
            outputs=(
                TensorSpec(model.text_output, FLOAT, ("text_batch", TEXT_WINDOW, model.text_width_2)),
                TensorSpec("text_embeds", FLOAT, ("text_batch", model.add_text_embeds_width)),
            ),
            description="SDXL's second text encoder: token ids -> one vector per token, and the projected pooled one",
        ),
    }


def _unet_specs(model: ModelInfo) -> dict[str, ComponentSpec]:
    """The UNet and the step-caching shallow UNet (inputs: latents, timestep, text, SDXL's added conditioning,
    ControlNet residuals; the shallow one also the full UNet's cached feature)."""
    unet_inputs = [
        TensorSpec("sample", FLOAT, ("unet_batch", model.unet_in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("unet_batch",)),
        TensorSpec("encoder_hidden_states", FLOAT, ("unet_batch", "text_length", model.context_width)),
    ]
    if model.add_text_embeds_width:
        unet_inputs.append(TensorSpec("text_embeds", FLOAT, ("unet_batch", model.add_text_embeds_width)))
    if model.add_time_ids:
        unet_inputs.append(TensorSpec("time_ids", FLOAT, ("unet_batch", model.add_time_ids)))
    residuals = _residual_tensors(model)
    noise_pred = TensorSpec("noise_pred", FLOAT, ("unet_batch", model.latent_channels, "latent_height", "latent_width"))
    feature = _feature_tensors(model)
    shallow_inputs = [t for t in unet_inputs if model.cache_context or t.name != "encoder_hidden_states"]
    return {
        "unet": ComponentSpec(
            "unet",
            inputs=(*unet_inputs, *residuals),
            outputs=(noise_pred, *feature),
            description="UNet: noisy latents, timestep, text vectors -> model prediction",
            fp32_inputs=("timestep",),
        ),
        "unet_shallow": ComponentSpec(
            "unet_shallow",
            inputs=(*shallow_inputs, *residuals[: model.cache_branch + 1], *feature),
            outputs=(noise_pred,),
            description="shallow UNet (step caching): the UNet's outer layers, from the full UNet's cached feature",
            fp32_inputs=("timestep",),
        ),
    }


def _vae_specs(model: ModelInfo) -> dict[str, ComponentSpec]:
    latent = ("batch", model.latent_channels, "latent_height", "latent_width")
    image = TensorSpec("image", FLOAT, ("batch", 3, "height", "width"))
    return {
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent", FLOAT, latent),),
            outputs=(image,),
            description="VAE decoder: unscaled latents -> image in [-1, 1]",
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(image,),
            outputs=(TensorSpec("latent_mean", FLOAT, latent), TensorSpec("latent_std", FLOAT, latent)),
            description="VAE encoder: image in [-1, 1] -> mean and std of the (unscaled) latent",
        ),
    }


def _residual_tensors(model: ModelInfo) -> tuple[TensorSpec, ...]:
    """The UNet's ControlNet residual inputs: per-row feature maps at 1/downscale of the latent size."""
    tensors = []
    for name, (channels, factor) in zip(control_input_names(model), model.control_residuals, strict=True):
        suffix = f"/{factor}" if factor > 1 else ""
        h, w = f"latent_height{suffix}", f"latent_width{suffix}"
        tensors.append(TensorSpec(name, FLOAT, ("unet_batch", channels, h, w)))
    return tuple(tensors)


def _feature_tensors(model: ModelInfo) -> tuple[TensorSpec, ...]:
    """The cached feature (one per UNet row) of a step-cache model; none otherwise."""
    if not model.step_cache:
        return ()
    channels, factor = model.cache_feature
    suffix = f"/{factor}" if factor > 1 else ""
    dims = ("unet_batch", channels, f"latent_height{suffix}", f"latent_width{suffix}")
    return (TensorSpec(CACHE_FEATURE, FLOAT, dims),)


def controlnet_spec(model: ModelInfo, component: str) -> ComponentSpec:
    """A ControlNet component of ``model``: the UNet's own inputs (without residuals) and the hint in, the
    residuals the UNet takes out (unscaled: the runtime scales them per step)."""
    if not model.control_ready:
        raise ShapeError("this model's UNet takes no ControlNet residuals, so it can have no ControlNet components")
    unet = component_specs(model)["unet"]
    residual_names = set(control_input_names(model))
    # a ControlNet reads the latents alone, also beside an inpainting UNet (as diffusers' ControlNet inpaint
    # pipeline feeds it)
    latents = TensorSpec("sample", FLOAT, ("unet_batch", model.latent_channels, "latent_height", "latent_width"))
    inputs = [latents if t.name == "sample" else t for t in unet.inputs if t.name not in residual_names]
    inputs.append(TensorSpec("controlnet_cond", FLOAT, ("unet_batch", 3, "height", "width")))
    return ComponentSpec(
        component,
        inputs=tuple(inputs),
        outputs=_residual_tensors(model),
        description="ControlNet: the UNet's inputs and a hint image -> residuals for the UNet",
        fp32_inputs=("timestep",),
    )


def component_spec(model: ModelInfo, component: str) -> ComponentSpec:
    """The spec of any component of ``model``: a network of ``COMPONENTS`` or a ``controlnet_<name>``."""
    if is_controlnet(component):
        return controlnet_spec(model, component)
    specs = component_specs(model)
    if component not in specs:
        raise KeyError(component)
    return specs[component]


def resolve_dim(dim: str | int, sizes: Mapping[str, int]) -> int:
    """A concrete size for ``dim``: an int, a symbol of ``sizes``, or ``symbol/k`` (that size divided by k)."""
    if isinstance(dim, int):
        return dim
    base, _, factor = dim.partition("/")
    return sizes[base] // int(factor) if factor else sizes[base]


Range = tuple[int, int, int]


def dim_ranges(profile: ShapeProfile, model: ModelInfo) -> dict[str, Range]:
    """min/opt/max of every symbolic dimension under ``profile``."""
    s = model.vae_scale_factor
    k = profile.max_prompt_windows
    return {
        "batch": (profile.min_batch, profile.opt_batch, profile.max_batch),
        # prompt + negative prompt, each split into up to k windows
        "text_batch": (1, 2 * profile.opt_batch, 2 * profile.max_batch * k),
        # without guidance the uncond half is dropped; with it the batch doubles
        "unet_batch": (profile.min_batch, 2 * profile.opt_batch, 2 * profile.max_batch),
        "height": (profile.min_height, profile.opt_height, profile.max_height),
        "width": (profile.min_width, profile.opt_width, profile.max_width),
        "latent_height": (profile.min_height // s, profile.opt_height // s, profile.max_height // s),
        "latent_width": (profile.min_width // s, profile.opt_width // s, profile.max_width // s),
        "text_length": (TEXT_WINDOW, TEXT_WINDOW, TEXT_WINDOW * k),
    }


def shape_ranges(
    spec: ComponentSpec, profile: ShapeProfile, model: ModelInfo
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Concrete (min, opt, max) shape of every input of ``spec`` under ``profile``."""
    dims = dim_ranges(profile, model)
    result = {}
    for tensor in spec.inputs:
        triple = []
        for which in range(3):
            sizes = {name: values[which] for name, values in dims.items()}
            triple.append(tuple(resolve_dim(d, sizes) for d in tensor.shape))
        result[tensor.name] = (triple[0], triple[1], triple[2])
    return result


def check_size(height: int, width: int, model: ModelInfo) -> None:
    """Raise ShapeError unless an image of height x width can run through this model's networks."""
    if height <= 0 or width <= 0:
        raise ShapeError(
            f"image size must be positive, got {width}x{height}; give a size such as "
            f"{model.native_size or 512}x{model.native_size or 512}, or leave it out for the artifact's own"
        )
    if height % 8 or width % 8:
        raise ShapeError(
            f"image size must be a multiple of 8 pixels, got {width}x{height}; "
            f"try {round(width / 8) * 8}x{round(height / 8) * 8}"
        )
    m = model.size_multiple
    if height % m or width % m:
        raise ShapeError(
            f"this model downsamples its latents {model.unet_downsamples} times, so image sides must be "
            f"multiples of {m} pixels; got {width}x{height}, try "
            f"{max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}"
        )


def check_profile_fits(model: ModelInfo, profile: ShapeProfile) -> None:
    """Raise ShapeError unless every min/opt/max size of ``profile`` can run through this model's networks."""
    m = model.size_multiple
    for which in ("min", "opt", "max"):
        h, w = getattr(profile, f"{which}_height"), getattr(profile, f"{which}_width")
        if h % m or w % m:
            raise ShapeError(
                f"{which} size {w}x{h} does not fit this model: its UNet downsamples the latents "
                f"{model.unet_downsamples} times, so image sides must be multiples of {m} pixels"
            )
