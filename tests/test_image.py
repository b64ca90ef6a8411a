"""Image preprocessing against the references: grid choice, resize, pixels, bad input.

The reference processors cannot run here as a whole (both import ``torchvision``, which is not
installable on this machine), so we run their grid/resize/pad/split code itself: the functions
are lifted out of the installed source files with ``ast`` (without their torchvision imports) and
executed unchanged. Where they call torchvision on a PIL image we substitute the documented
equivalent (``torchvision.transforms.functional.resize`` on a PIL image is ``PIL.Image.resize``
with the same filter; ``ToTensor`` + ``Normalize(0.5, 0.5)`` is ``(x / 255 - 0.5) / 0.5``).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import random
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llama4.image import (
    MAX_PIXELS,
    ImageError,
    best_grid,
    fit_size,
    load_image,
    normalize,
    preprocess_image,
    supported_grids,
)

S = 336


# --------------------------------------------------------------------------------------------
# The reference code, lifted from the installed packages
# --------------------------------------------------------------------------------------------


def _source_of(module: str, relpath: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relpath
    return path if path.exists() else None


def _exec_defs(path: Path, names: set[str], namespace: dict) -> dict:
    """Execute the top-level functions/classes ``names`` of ``path`` (decorators dropped)."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in nodes} == names, f"reference code changed: {names} not all in {path}"
    for n in nodes:
        if isinstance(n, ast.FunctionDef):
            n.decorator_list = []  # lru_cache on find_supported_resolutions
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


class _PilFunctional:
    """``torchvision.transforms.functional.resize`` for PIL images: PIL's resize, same filter."""

    @staticmethod
    def resize(img: Image.Image, size: tuple[int, int], interpolation) -> Image.Image:
        assert interpolation == "bilinear"
        return img.resize((size[1], size[0]), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def hf():
    path = _source_of("transformers", "models/llama4/image_processing_llama4.py")
    if path is None:
        pytest.skip("transformers' Llama 4 image processor source not found")
    names = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions", "get_best_fit"}
    ns = _exec_defs(path, names, {"torch": torch, "math": math, "defaultdict": defaultdict})
    return SimpleNamespace(**{n: ns[n] for n in names})


@pytest.fixture(scope="module")
def meta():
    path = _source_of("llama_models", "llama4/preprocess.py")
    if path is None:
        pytest.skip("llama_models' llama4/preprocess.py not found")
    ns = _exec_defs(
        path,
        {"VariableSizeImageTransform"},
        {"torch": torch, "math": math, "defaultdict": defaultdict, "Image": Image, "F": _PilFunctional}
        | {"Optional": Optional, "Set": set, "Tuple": tuple, "IMAGE_RES": S},  # the module's globals
    )
    cls = ns["VariableSizeImageTransform"]
    transform = cls.__new__(cls)  # its __init__ builds torchvision transforms we do not need
    transform.size = S
    transform.resample = "bilinear"
    return transform


def hf_grid_and_fit(hf, size_hw, tile, max_tiles):
    """HF ``Llama4ImageProcessor._preprocess``: canvas choice and resized size (transcribed).

    HF's canvas is a tensor, so the resize arithmetic runs in float32: its floor can land one
    pixel below Meta's float64 result (e.g. 600x800 -> 251 rows instead of 252).
    """
    square = SimpleNamespace(height=tile, width=tile)
    resolutions = torch.tensor(hf.find_supported_resolutions(max_tiles, square))
    target = hf.get_best_fit(size_hw, resolutions, resize_to_max_canvas=False)
    cap_h = min(max(size_hw[0], tile), target[0])
    cap_w = min(max(size_hw[1], tile), target[1])
    new = hf.get_max_res_without_distortion(size_hw, (cap_h, cap_w))
    grid = (int(target[0]) // tile, int(target[1]) // tile)
    return grid, (max(int(new[0]), 1), max(int(new[1]), 1))


def meta_grid_and_fit(meta, size_hw, max_tiles):
    """Meta's ``VariableSizeImageTransform``: canvas choice and resized size, in (height, width).

    Meta works in (width, height) with Python ints (float64 arithmetic); the three lines that cap
    the upscaling are transcribed from ``resize_without_distortion``.
    """
    h, w = size_hw
    resolutions = torch.tensor(meta.find_supported_resolutions(max_num_chunks=max_tiles, patch_size=S))
    cw, ch = meta.get_best_fit((w, h), resolutions)
    cap = (min(max(w, S), cw), min(max(h, S), ch))
    new_w, new_h = meta.get_max_res_without_distortion((w, h), cap)
    return (ch // S, cw // S), (max(new_h, 1), max(new_w, 1))


def meta_preprocess(meta, image: Image.Image, max_tiles: int):
    """Meta's ``VariableSizeImageTransform.__call__`` + the global tile of ``chat_format``."""
    w, h = image.size
    resolutions = torch.tensor(meta.find_supported_resolutions(max_num_chunks=max_tiles, patch_size=S))
    best = meta.get_best_fit((w, h), resolutions)  # (canvas width, canvas height)
    resized = meta.resize_without_distortion(image, best, S)
    padded = meta._pad(resized, best)
    tiles = meta._split(normalize(padded), best[0] // S, best[1] // S)
    grid = (best[1] // S, best[0] // S)
    if tiles.shape[0] > 1:
        thumbnail = normalize(image.resize((S, S), Image.Resampling.BILINEAR))  # tv.Resize((S, S))
        tiles = torch.cat([tiles, thumbnail[None]])
    return tiles, grid


# --------------------------------------------------------------------------------------------
# Grid choice and resized size
# --------------------------------------------------------------------------------------------

# (height, width): squares, tiny, around one tile, photos, panoramas both ways, extremes.
SIZES = [
    (1, 1), (3, 5), (5, 3), (14, 14), (100, 50), (50, 100), (335, 336), (336, 336), (337, 336),
    (336, 337), (512, 512), (600, 800), (800, 600), (672, 1008), (1008, 672), (720, 1280),
    (1280, 720), (1280, 1280), (2000, 500), (500, 2000), (3000, 4000), (4000, 3000),
    (100, 4000), (4000, 100), (1, 10000), (10000, 1), (5376, 336), (336, 5376), (5377, 336),
    (20000, 20000), (1, 89_000_000),
]  # fmt: skip


def _ours(size, max_tiles):
    grid = best_grid(size, S, max_tiles)
    return grid, fit_size(size, grid, S)


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 9, 16, 30])
def test_grid_and_fit_match_references(hf, meta, max_tiles):
    for size in SIZES:
        ours = _ours(size, max_tiles)
        assert ours == meta_grid_and_fit(meta, size, max_tiles), f"size={size} max_tiles={max_tiles}"
        hf_grid, hf_new = hf_grid_and_fit(hf, size, S, max_tiles)
        assert ours[0] == hf_grid, f"size={size} max_tiles={max_tiles}"
        assert abs(ours[1][0] - hf_new[0]) <= 1 and abs(ours[1][1] - hf_new[1]) <= 1  # float32 floor


def test_grid_and_fit_match_references_random_sweep(hf, meta):
    rng = random.Random(0)
    for _ in range(400):
        size = (rng.randint(1, 6000), rng.randint(1, 6000))
        max_tiles = rng.choice([4, 16])
        ours = _ours(size, max_tiles)
        assert ours == meta_grid_and_fit(meta, size, max_tiles), f"size={size}"
        assert ours[0] == hf_grid_and_fit(hf, size, S, max_tiles)[0], f"size={size}"


def test_grid_examples():
    # Spelled out, so a reader sees the rule (all agree with the references above).
    assert best_grid((512, 512), S, 16) == (2, 2)  # least upscaling: 672/512
    assert best_grid((1280, 1280), S, 16) == (4, 4)
    assert best_grid((100, 50), S, 16) == (1, 1)  # small: one tile, upscaled to fill it
    assert fit_size((100, 50), (1, 1), S) == (336, 168)
    assert best_grid((100, 4000), S, 16) == (1, 12)  # 4032 >= 4000 is the least upscaling
    assert fit_size((100, 4000), (1, 12), S) == (100, 4000)  # never enlarged beyond one tile side
    assert best_grid((4000, 100), S, 16) == (12, 1)
    assert best_grid((3000, 4000), S, 16) == (3, 4)  # cannot upscale: least downscaling
    assert fit_size((3000, 4000), (3, 4), S) == (1008, 1344)
    assert best_grid((1, 10000), S, 16) == (1, 16)
    assert best_grid((5000, 5000), S, 1) == (1, 1)


def test_supported_grids():
    grids = supported_grids(16)
    assert len(grids) == len(set(grids)) == sum(16 // r for r in range(1, 17))
    assert all(r * c <= 16 for r, c in grids)
    with pytest.raises(ValueError):
        supported_grids(0)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _random_photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth random content (like a photo), so resampling differences are realistic."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)
    return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.mark.parametrize("hw", [(200, 131), (512, 512), (700, 1000), (300, 1500), (50, 20), (1344, 1344)])
def test_pixels_equal_meta_reference(meta, hw):
    image = _random_photo(*hw)
    ours = preprocess_image(image, tile_size=S, max_tiles=16)
    ref_tiles, ref_grid = meta_preprocess(meta, image, 16)
    assert ours.grid == ref_grid
    assert torch.equal(ours.pixel_values, ref_tiles)


@pytest.mark.parametrize("hw", [(200, 131), (700, 1000), (300, 1500)])
def test_pixels_close_to_hf_tensor_path(hf, hw):
    # HF resizes uint8 tensors with torch's antialiased bilinear kernel (via torchvision), pads
    # with 0, normalises (in bfloat16; float32 here) and splits. Pillow and that kernel round
    # differently by at most one grey level.
    image = _random_photo(*hw)
    ours = preprocess_image(image, tile_size=S, max_tiles=16)
    grid, (new_h, new_w) = hf_grid_and_fit(hf, hw, S, 16)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    padded = F.pad(resized, (0, grid[1] * S - new_w, 0, grid[0] * S - new_h))
    tiles = padded[0].float().div(255).sub(0.5).div(0.5)
    tiles = tiles.view(3, grid[0], S, grid[1], S).permute(1, 3, 0, 2, 4).reshape(-1, 3, S, S)
    if grid[0] * grid[1] > 1:
        thumb = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        tiles = torch.cat([tiles, thumb.float().div(255).sub(0.5).div(0.5)])
    assert ours.grid == grid and fit_size(hw, grid, S) == (new_h, new_w)  # sizes chosen to agree
    assert (ours.pixel_values - tiles).abs().max() <= 2 / 255 + 1e-6  # one grey level


def _level(v: int) -> torch.Tensor:
    """The normalised value of grey level v, computed the way the pipeline does (float32)."""
    return torch.tensor(float(v)).div(255).sub(0.5).div(0.5)


def test_tile_order_padding_and_normalisation():
    # 672 x 1008 fits a 2 x 3 grid exactly (scale 1): no resampling, so values are exact.
    h, w = 2 * S, 3 * S
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            arr[r * S : (r + 1) * S, c * S : (c + 1) * S] = (10 * (r * 3 + c), 255, 128)
    out = preprocess_image(Image.fromarray(arr))
    assert out.grid == (2, 3) and out.n_tiles == 7 and out.has_global_tile
    assert out.pixel_values.shape == (7, 3, S, S) and out.pixel_values.dtype == torch.float32
    for i in range(6):  # row-major tiles
        tile = out.pixel_values[i]
        assert torch.all(tile[0] == _level(10 * i))
        assert torch.all(tile[1] == 1.0) and torch.all(tile[2] == _level(128))
        assert abs(_level(128).item() - (128 / 255 - 0.5) / 0.5) < 1e-6
    # The global tile (last) sees the whole image: a mix of every tile's red value.
    red = out.pixel_values[6, 0]
    assert red.min() < _level(10) and red.max() > _level(40)


def test_resize_keeps_aspect_and_pads_with_black():
    image = Image.new("RGB", (1000, 300), (255, 255, 255))  # width 1000, height 300
    out = preprocess_image(image)
    assert out.grid == best_grid((300, 1000), S, 16) == (1, 3)
    new_h, new_w = fit_size((300, 1000), (1, 3), S)
    assert (new_h, new_w) == (300, 1000)  # fits a 336 x 1008 canvas without resizing
    canvas = out.pixel_values[:3].permute(1, 2, 0, 3).reshape(3, S, 3 * S)  # tiles side by side
    assert torch.all(canvas[:, :new_h, :new_w] == 1.0)  # white stays white
    assert torch.all(canvas[:, new_h:, :] == -1.0) and torch.all(canvas[:, :, new_w:] == -1.0)
    # The global tile is the whole image squeezed to S x S (aspect not kept): no padding.
    assert torch.all(out.pixel_values[3] == 1.0)
    # Downscaled image: aspect ratio kept to within a pixel.
    h, w = fit_size((3000, 4000), best_grid((3000, 4000), S, 16), S)
    assert abs(h / w - 3000 / 4000) < 1 / min(h, w)


def test_single_tile_has_no_global_tile():
    out = preprocess_image(Image.new("RGB", (200, 100), (0, 0, 0)))
    assert out.grid == (1, 1) and out.n_tiles == 1 and not out.has_global_tile
    assert out.pixel_values.shape == (1, 3, S, S)


def test_other_tile_sizes_and_max_tiles():
    out = preprocess_image(_random_photo(300, 400), tile_size=56, max_tiles=4)
    assert out.grid == best_grid((300, 400), 56, 4) == (2, 2)
    assert out.pixel_values.shape == (5, 3, 56, 56)
    assert preprocess_image(_random_photo(300, 400), max_tiles=1).pixel_values.shape == (1, 3, S, S)


# --------------------------------------------------------------------------------------------
# Loading: sources, modes, alpha, orientation
# --------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_sources_path_bytes_file_pil(tmp_path):
    image = _random_photo(40, 60)
    data = _encode(image, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    ref = np.asarray(image)
    for source in (path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), ref)


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (0, 0, 0, 255))  # one opaque black pixel
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    for image in (rgba, rgba.convert("LA"), rgba.convert("PA")):
        px = np.asarray(load_image(image))
        assert px[1, 1].tolist() == [255, 255, 255] and px[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(load_image(half))[0, 0].tolist() == [127, 127, 127]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    palette.putpixel((1, 0), 1)
    px = np.asarray(load_image(_encode(palette, "PNG", transparency=1)))  # index 1 transparent
    assert px.tolist() == [[[255, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_any_mode_becomes_rgb(mode):
    out = preprocess_image(Image.new(mode, (30, 20)))
    assert out.pixel_values.shape == (1, 3, S, S)


def test_exif_orientation_applied():
    image = Image.new("RGB", (200, 100), (255, 0, 0))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    loaded = load_image(_encode(image, "JPEG", exif=exif))
    assert loaded.size == (100, 200)  # tall


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(buf.getvalue()))[0, 0].tolist() == [255, 0, 0]


# --------------------------------------------------------------------------------------------
# Bad input: a clear ImageError (a ValueError), never a crash or a hang
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG with a chosen header; IDAT as given (default: almost nothing)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = idat or zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: kilobytes on disk, width*height pixels decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return _png(width, height, bit_depth=1, color_type=0, idat=idat)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_truncated_files():
    image = _random_photo(120, 160)
    png, jpeg = _encode(image, "PNG"), _encode(image, "JPEG")
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 2], jpeg[:20], png[:30]):
        with pytest.raises(ImageError, match="cannot read an image"):
            preprocess_image(data)


def test_not_an_image(tmp_path):
    for data in (b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, b"\xff\xd8\xff" + b"\x00" * 100):
        with pytest.raises(ImageError):
            preprocess_image(data)
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError):
        load_image(12345)


def test_zero_size():
    with pytest.raises(ImageError):
        load_image(_png(0, 10))
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_absurd_dimensions_in_header():
    # Headers claiming huge images over almost no data: refused before any pixel is allocated.
    for w, h in ((2**31 - 1, 2**31 - 1), (100_000, 100_000), (2**31 - 1, 1)):
        with pytest.raises(ImageError, match="too large|over the limit"):
            load_image(_png(w, h))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs():
    # 20000 x 20000 (400 MP, ~1 MB of PNG): Pillow's own check refuses it at open.
    with pytest.raises(ImageError, match="too large"):
        load_image(_bomb(20000, 20000))
    # 10000 x 9500 (95 MP, ~30 kB): Pillow only warns; our limit refuses it before decoding.
    with pytest.raises(ImageError, match=f"over the limit of {MAX_PIXELS}"):
        load_image(_bomb(10000, 9500))
    # The limit is a parameter: a 2000 x 2000 image against max_pixels=1e6.
    with pytest.raises(ImageError, match="over the limit of 1000000"):
        load_image(_bomb(2000, 2000), max_pixels=1_000_000)
    assert load_image(_bomb(2000, 2000)).size == (2000, 2000)
    # preprocess_image takes the same limit (the server passes its own, which may exceed the
    # default), for encoded images and for images loaded already.
    with pytest.raises(ImageError, match="over the limit of 1000000"):
        preprocess_image(_bomb(2000, 2000), max_pixels=1_000_000)
    loaded = load_image(_bomb(2000, 2000))
    with pytest.raises(ImageError, match="over the limit of 1000000"):
        preprocess_image(loaded, max_pixels=1_000_000)
    assert preprocess_image(loaded, max_pixels=4_000_000).grid == (4, 4)
