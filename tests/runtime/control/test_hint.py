"""Control hints: A1111's resize modes measured on real images, canny against cv2.Canny, every bad input refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdtrt.runtime.control.hint import (
    HintOptions,
    ResizeMode,
    build_hint,
    fit_hint,
    load_hint_image,
    otsu_binarize,
    pixel_perfect_resolution,
    prepare_hint,
    preprocess_hint,
)
from sdtrt.runtime.errors import ConfigError, ControlError

cv2 = pytest.importorskip("cv2")

WHITE, RED = (255, 255, 255), (255, 0, 0)


def drawn(size: tuple[int, int], box: tuple[int, int, int, int], background=(0, 0, 0), fill=WHITE) -> Image.Image:
    """An RGB image of ``size`` with a filled rectangle over ``box`` (left, top, right, bottom; inclusive)."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).rectangle(box, fill=fill)
    return image


def white_box(hint: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the pixels brighter than mid-grey in every channel."""
    ys, xs = np.nonzero((hint[0] > 0.5).all(dim=0).numpy())
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_output_is_rgb_in_unit_range_at_the_image_size():
    image = drawn((100, 60), (10, 10, 40, 40), background=(0, 128, 255), fill=RED)
    hint = prepare_hint(image, 64, 48, "just_resize")
    assert hint.shape == (1, 3, 48, 64) and hint.dtype == torch.float32 and hint.is_contiguous()
    assert float(hint.min()) >= 0.0 and float(hint.max()) <= 1.0
    # RGB order and no [-1, 1] normalisation: the background (0, 128, 255) is kept as it is
    assert hint[0, :, -1, -1].tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def test_same_size_none_hint_is_the_image_over_255():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    for mode in ResizeMode:
        hint = prepare_hint(Image.fromarray(pixels), 48, 32, mode)
        assert torch.equal(hint[0].permute(1, 2, 0), torch.from_numpy(pixels.astype(np.float32) / 255))


def test_just_resize_stretches_the_whole_image():
    # a box over the left half of a 2:1 image covers the left half of a square hint
    hint = prepare_hint(drawn((128, 64), (0, 0, 63, 63)), 64, 64, ResizeMode.JUST_RESIZE)
    assert white_box(hint) == (0, 0, 31, 63)


def test_crop_and_resize_cuts_the_overflow_evenly():
    # 128x64 -> 64x64: scale 1 (the height fits), 32 columns cut from each side; a box at x 32..95 fills the hint
    hint = prepare_hint(drawn((128, 64), (32, 16, 95, 47)), 64, 64, "Crop and Resize")
    assert white_box(hint) == (0, 16, 63, 47)
    # a box in the cut-off margin is gone
    assert float(prepare_hint(drawn((128, 64), (0, 0, 20, 63)), 64, 64, 1).max()) == 0.0


def test_crop_and_resize_is_the_default_mode():
    image = drawn((128, 64), (32, 16, 95, 47))
    assert torch.equal(prepare_hint(image, 64, 64), prepare_hint(image, 64, 64, "crop_and_resize"))


def test_resize_and_fill_pads_evenly_with_the_border_colour():
    # 128x64 -> 64x64: scale 0.5, the image takes rows 16..47, the rest is the median border colour (blue)
    image = drawn((128, 64), (16, 16, 47, 47), background=(0, 0, 255))
    hint = prepare_hint(image, 64, 64, 2)
    assert white_box(hint) == (8, 24, 23, 39)
    assert hint[0, :, :16].flatten(1).unique(dim=1).tolist() == [[0.0], [0.0], [1.0]]
    assert hint[0, :, 48:].flatten(1).unique(dim=1).tolist() == [[0.0], [0.0], [1.0]]


def test_resize_and_fill_on_a_tall_image_pads_left_and_right():
    image = drawn((32, 64), (0, 0, 31, 31))  # top half white, 1:2
    hint = fit_hint(np.asarray(image), 64, 64, ResizeMode.RESIZE_AND_FILL)
    assert hint.shape == (64, 64, 3)
    ys, xs = np.nonzero(hint[:, :, 0] > 127)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (16, 0, 47, 31)


def test_resize_modes_accept_a1111_labels_codes_and_old_aliases():
    assert ResizeMode.parse("Just Resize") is ResizeMode.JUST_RESIZE
    assert ResizeMode.parse(0) is ResizeMode.JUST_RESIZE
    assert ResizeMode.parse(1) is ResizeMode.CROP_AND_RESIZE
    assert ResizeMode.parse("Inner Fit (Scale to Fit)") is ResizeMode.CROP_AND_RESIZE
    assert ResizeMode.parse("Resize and Fill") is ResizeMode.RESIZE_AND_FILL
    assert ResizeMode.parse("Envelope (Outer Fit)") is ResizeMode.RESIZE_AND_FILL
    assert HintOptions(64, 64, mode="resize_and_fill").mode is ResizeMode.RESIZE_AND_FILL  # type: ignore[arg-type]


def test_few_colour_maps_keep_their_colours():
    """A segmentation-like map (3 to 199 colours) is resized with nearest neighbour: no blended colours."""
    image = Image.new("RGB", (30, 30), (10, 20, 30))
    ImageDraw.Draw(image).rectangle((0, 0, 14, 14), fill=(200, 0, 0))
    ImageDraw.Draw(image).rectangle((15, 15, 29, 29), fill=(0, 200, 0))
    hint = prepare_hint(image, 64, 64, "just_resize")
    colours = {tuple(c) for c in (hint[0].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert colours == {(10, 20, 30), (200, 0, 0), (0, 200, 0)}


def canny_of(image: Image.Image, low: int, high: int) -> np.ndarray:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return edges.astype(np.float32) / 255


def test_canny_is_cv2_canny_on_the_image_at_processor_res():
    image = drawn((64, 128), (10, 20, 50, 90), background=(40, 40, 40), fill=(200, 180, 30))
    hint = prepare_hint(image, 64, 128, preprocess="canny", processor_res=64)
    expected = canny_of(image, 100, 200)
    assert expected.sum() > 0
    for channel in range(3):
        assert np.array_equal(hint[0, channel].numpy(), expected)


def test_canny_runs_on_the_input_scaled_to_processor_res():
    # 128x256 scaled to a shorter side of 64 (area averaging, as A1111), then cv2.Canny; no resize after
    image = drawn((128, 256), (20, 40, 100, 180), background=(0, 0, 90), fill=(250, 250, 250))
    hint = prepare_hint(image, 64, 128, preprocess="canny", processor_res=64)
    resized = cv2.resize(np.asarray(image), (64, 128), interpolation=cv2.INTER_AREA)
    assert np.array_equal(hint[0, 0].numpy(), cv2.Canny(resized, 100, 200).astype(np.float32) / 255)


def test_canny_hint_is_binary_in_all_three_channels_after_resizing():
    image = drawn((200, 150), (30, 30, 120, 100), background=(20, 60, 20), fill=(220, 200, 40))
    hint = prepare_hint(image, 96, 64, "resize_and_fill", preprocess="canny", processor_res=128)
    assert set(hint.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hint[0, 0], hint[0, 1]) and torch.equal(hint[0, 1], hint[0, 2])


def test_canny_thresholds_change_the_edges():
    # steps of 20, 60 and 175 grey levels: Sobel gradients of 80, 240 and 700
    steps = np.repeat(np.array([0, 20, 80, 255], dtype=np.uint8), 16)[None, :].repeat(64, axis=0)
    image = Image.fromarray(steps)
    low = prepare_hint(image, 64, 64, preprocess="canny", low_threshold=20, high_threshold=60, processor_res=64)
    high = prepare_hint(image, 64, 64, preprocess="canny", low_threshold=200, high_threshold=250, processor_res=64)
    assert float(low.sum()) > float(high.sum()) > 0


def test_detected_map_is_at_processor_res():
    options = HintOptions(64, 64, preprocess="canny", processor_res=96)
    assert preprocess_hint(drawn((200, 100), (20, 20, 60, 60)), options).shape == (96, 192, 3)


def test_alpha_follows_a1111():
    opaque = np.zeros((16, 16, 4), dtype=np.uint8)
    opaque[..., 0], opaque[..., 3] = 200, 255
    assert prepare_hint(opaque, 16, 16)[0, 0].unique().tolist() == [pytest.approx(200 / 255)]  # the colours
    # a drawing on a transparent canvas: its alpha is the hint, whatever colour the strokes have
    canvas = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).rectangle((4, 4, 11, 11), fill=(0, 0, 0, 255))
    hint = prepare_hint(canvas, 16, 16)
    assert white_box(hint) == (4, 4, 11, 11) and float(hint[0, :, 0, 0].sum()) == 0.0
    # fully transparent: the colours under it (A1111 takes them as they are)
    clear = Image.new("RGBA", (16, 16), (0, 90, 0, 0))
    assert prepare_hint(clear, 16, 16)[0, 1].unique().tolist() == [pytest.approx(90 / 255)]


def test_greyscale_palette_and_la_images_become_rgb():
    grey = Image.new("L", (16, 16), 77)
    assert prepare_hint(grey, 16, 16)[0].flatten(1).unique(dim=1).tolist() == [[pytest.approx(77 / 255)]] * 3
    palette = grey.convert("RGB").quantize(colors=2)
    assert torch.equal(prepare_hint(palette, 16, 16), prepare_hint(grey, 16, 16))
    la = Image.new("LA", (16, 16), (77, 255))
    assert torch.equal(prepare_hint(la, 16, 16), prepare_hint(grey, 16, 16))
    assert torch.equal(prepare_hint(np.full((16, 16), 77, np.uint8), 16, 16), prepare_hint(grey, 16, 16))


def test_build_hint_takes_checked_options():
    image = drawn((64, 64), (8, 8, 23, 23))
    options = HintOptions(32, 32, ResizeMode.JUST_RESIZE)
    assert torch.equal(build_hint(image, options), prepare_hint(image, 32, 32, "just_resize"))


def test_pixel_perfect_resolution_is_a1111s():
    assert pixel_perfect_resolution(1024, 512, 512, 512, ResizeMode.CROP_AND_RESIZE) == 512
    assert pixel_perfect_resolution(1024, 512, 512, 512, ResizeMode.RESIZE_AND_FILL) == 256
    assert pixel_perfect_resolution(300, 200, 768, 512, ResizeMode.JUST_RESIZE) == 512


def test_otsu_splits_two_groups():
    grey = np.array([[10, 12, 14, 200, 210, 220]], dtype=np.uint8)
    assert otsu_binarize(grey).tolist() == [[0, 0, 0, 255, 255, 255]]
    assert otsu_binarize(np.zeros((2, 2), np.uint8)).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 60}, r"hint width must be a positive multiple of 8 .*got 60"),
        ({"height": 0}, r"hint height must be a positive multiple of 8 .*got 0"),
        ({"mode": "stretch"}, r"unknown resize mode 'stretch': expected one of just_resize, crop_and_resize, resize"),
        ({"mode": 3}, r"unknown resize mode 3: .*A1111's codes 0, 1, 2"),
        ({"mode": True}, r"unknown resize mode True"),
        ({"preprocess": "depth"}, r"unknown preprocessor 'depth': expected one of none, canny"),
        ({"low_threshold": 0}, r"canny low_threshold must be an integer from 1 to 255, got 0"),
        ({"high_threshold": 256}, r"canny high_threshold must be an integer from 1 to 255, got 256"),
        ({"low_threshold": 150, "high_threshold": 100}, r"low threshold \(150\) is above the high threshold \(100\)"),
        ({"processor_res": 32}, r"processor_res must be an integer from 64 to 4096, got 32"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    args = {"width": 64, "height": 64, "mode": "just_resize", **kwargs}
    with pytest.raises(ConfigError, match=match):
        prepare_hint(drawn((8, 8), (0, 0, 1, 1)), args.pop("width"), args.pop("height"), args.pop("mode"), **args)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (Image.new("RGB", (0, 10)), r"hint image is empty \(0x10 pixels\)"),
        (np.zeros((0, 4, 3), np.uint8), r"hint image is empty \(shape \[0, 4, 3\]\)"),
        (np.zeros((4, 4, 3), np.float32), r"hint array must be uint8 \(0..255\), got float32"),
        (np.zeros((4, 4, 2), np.uint8), r"hint array must be \[H, W\].*got shape \[4, 4, 2\]"),
        (Image.new("I;16", (4, 4)), r"'I;16' pixels \(16- or 32-bit\); expected an 8-bit image"),
        ("hint.png", r"hint image must be a PIL image or a uint8 numpy array, got str; open files with"),
    ],
)
def test_bad_images_are_refused(image, match):
    with pytest.raises(ControlError, match=match):
        prepare_hint(image, 64, 64)


def test_options_are_checked_before_the_image():
    with pytest.raises(ConfigError, match="unknown preprocessor"):
        prepare_hint(np.zeros((0, 0, 3), np.uint8), 64, 64, preprocess="hed")


def test_load_hint_image_reads_files_and_bytes(tmp_path):
    path = tmp_path / "hint.png"
    drawn((24, 16), (0, 0, 5, 5)).save(path)
    assert load_hint_image(path).size == (24, 16)
    assert load_hint_image(path.read_bytes()).size == (24, 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ControlError, match=r"hint image '.*notes.png' is not an image Pillow can read"):
        load_hint_image(tmp_path / "notes.png")
    with pytest.raises(ControlError, match=r"hint image '.*missing.png' does not exist; give the path of a PNG"):
        load_hint_image(tmp_path / "missing.png")
    with pytest.raises(ControlError, match=r"the hint image is not an image Pillow can read .*PNG, JPEG or WebP"):
        load_hint_image(b"\x89PNG truncated")


def test_a_palette_image_with_a_transparent_index_is_a_drawing_on_a_canvas():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 30, 30, 30])
    image.info["transparency"] = 0
    ImageDraw.Draw(image).rectangle((2, 3, 9, 12), fill=1)
    assert white_box(prepare_hint(image, 16, 16)) == (2, 3, 9, 12)


def test_canny_without_opencv_names_the_extra():
    """The hint module imports without OpenCV; only canny needs it, and says how to install it."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cv2":
            raise ImportError("blocked cv2")
sys.meta_path.insert(0, Block())
import numpy as np
from sdtrt.runtime.control.hint import prepare_hint
from sdtrt.runtime.errors import MissingDependencyError
print(tuple(prepare_hint(np.zeros((8, 8, 3), np.uint8), 16, 16).shape))
try:
    prepare_hint(np.zeros((8, 8, 3), np.uint8), 16, 16, preprocess="canny")
except MissingDependencyError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "(1, 3, 16, 16)"
    assert "canny preprocessing of ControlNet hints needs the Python module 'cv2'" in lines[1]
    assert 'pip install "sdtrt[control]"' in lines[1]
