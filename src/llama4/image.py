"""Images in, pixel tiles out: Llama 4's image preprocessing.

An image becomes a grid of ``S x S`` tiles (S = ``VisionConfig.image_size``, 336) plus, when the
grid has more than one tile, a global thumbnail tile. The steps and their sources:

1. **Load** (:func:`load_image`): anything Pillow reads, from a path, bytes or a PIL image. EXIF
   orientation is applied (as ``transformers.image_utils.load_image`` does); transparency is
   composited on white (as Meta's ``llama_models.llama4.chat_format.convert_image_to_rgb`` does
   for RGBA; we do it for every mode that carries alpha); then RGB.
2. **Choose the grid** (:func:`best_grid`): among all grids ``rows x cols`` with at most
   ``max_tiles`` tiles, take the canvas ``(rows*S, cols*S)`` that needs the *least upscaling*
   (smallest scale >= 1) if any canvas can hold the image at scale >= 1, else the *least
   downscaling* (largest scale < 1); the scale of a canvas is ``min(canvas_h / h, canvas_w / w)``
   (the limiting side, so no distortion). Ties go to the smallest canvas area (least padding).
   This is ``get_best_fit`` of Meta's ``VariableSizeImageTransform`` and of HF's
   ``Llama4ImageProcessor`` (default ``resize_to_max_canvas=False``). We compare the scales as
   exact fractions; the references compare float32 values, which can only disagree for a
   near-tie between distinct fractions, i.e. images with a side over ~10^6 pixels.
3. **Resize without distortion** (:func:`fit_size`): a side may grow to at most one tile side
   (an image smaller than a tile grows until its longer side fills the tile; a larger image is
   never enlarged, only shrunk as far as the canvas demands); the aspect ratio is kept, with the
   reference's float64 ``floor`` rounding (HF's float32 arithmetic is sometimes one pixel short).
   Resampling is Pillow's bilinear filter (antialiased when shrinking), exactly what Meta's
   reference calls through ``torchvision`` on a PIL image; HF's tensor path (``torch``
   antialiased bilinear on uint8) differs from it by at most 1 grey level.
4. **Pad** the resized image at the bottom and right with black to the canvas.
5. **Normalise**: ``(x / 255 - 0.5) / 0.5`` in float32, i.e. [-1, 1]; padding becomes -1.
   (HF's processor rounds this step to bfloat16; Meta's stays float32, as we do.)
6. **Cut** the canvas into tiles in row-major order (tile (r, c) is index ``r * cols + c``).
7. **Global tile**: if the grid has more than one tile, the whole loaded image resized to
   ``S x S`` (aspect NOT kept, as in both references), normalised, appended LAST. It matches the
   token layout of the chat format: per-tile ``<|patch|>`` runs in row-major order, then
   ``<|image|>`` and the global tile's patches.

Untrusted input: every failure to read an image raises :class:`ImageError` (a ``ValueError``)
with a message. Limits, applied without touching Pillow's process-wide settings:

- the pixel count (width x height, read from the header before any pixel is decoded) must not
  exceed ``max_pixels`` (default :data:`MAX_PIXELS`, Pillow's own default bomb threshold of
  89,478,485 pixels, ~0.25 GiB as RGB). Pillow itself refuses headers above twice its global
  ``Image.MAX_IMAGE_PIXELS`` before we see them (reported as ``ImageError`` too), so raising
  ``max_pixels`` beyond that also needs ``PIL.Image.MAX_IMAGE_PIXELS`` raised by the caller.
  Pillow emits its ``DecompressionBombWarning`` for headers over its threshold before we refuse
  them; we do not silence it (``warnings.catch_warnings`` is process-global, not thread-safe);
- zero-sized images are refused;
- truncated files are refused (Pillow raises while decoding) unless the process has set
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` (Meta's ``preprocess.py`` sets it on import), in
  which case Pillow fills the missing part and we cannot tell.

Work is bounded by the pixel limit, so no input can make this hang: an 89 MP JPEG takes about
2 s on one CPU core here (decode 0.3 s, the two exact bilinear resizes 1.5 s). Only the first
frame of an animation is used.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "ImageInput",
    "best_grid",
    "fit_size",
    "load_image",
    "normalize",
    "preprocess_image",
    "supported_grids",
]

# Pillow's default decompression-bomb threshold: 1 GiB / 4 bytes / 3 (~89.5 megapixels).
MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, truncated, empty or too large."""


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image, ready for the vision tower and the chat format.

    ``pixel_values`` holds the ``rows * cols`` grid tiles in row-major order, then the global
    tile when ``rows * cols > 1``.
    """

    pixel_values: torch.Tensor  # (n_tiles, 3, S, S) float32 in [-1, 1]
    grid: tuple[int, int]  # (tile rows, tile cols)

    @property
    def n_tiles(self) -> int:
        """Tiles in ``pixel_values``: the grid, plus the global tile if the grid has more than one."""
        return self.pixel_values.shape[0]

    @property
    def has_global_tile(self) -> bool:
        return self.grid[0] * self.grid[1] > 1


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image into an RGB PIL image (decoded, EXIF-oriented, alpha composited on white).

    ``source``: a path, the encoded bytes, a binary file object, or a PIL image (never modified;
    returned as is if it is already an upright RGB image without transparency).
    Raises :class:`ImageError` for anything that is not a readable image within the limits.
    """
    if isinstance(source, Image.Image):
        fp, what = None, "PIL image"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        fp, what = io.BytesIO(bytes(source)), f"{len(source)} bytes"
    elif isinstance(source, (str, os.PathLike)):
        fp, what = source, f"file {os.fspath(source)!r}"
    elif hasattr(source, "read"):
        fp, what = source, "file object"
    else:
        raise TypeError(f"expected a path, bytes, a file object or a PIL image, got {type(source).__name__}")
    try:
        if fp is None:
            return _decode(source, max_pixels)
        with Image.open(fp) as image:  # reads the header only
            return _decode(image, max_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check in Image.open
        raise ImageError(f"image in {what} is too large: {e}") from e
    except Exception as e:  # Pillow's decoders raise many types on malformed data
        raise ImageError(f"cannot read an image from {what}: {type(e).__name__}: {e}") from e


def _decode(image: Image.Image, max_pixels: int) -> Image.Image:
    """Checked, decoded, oriented, RGB. Copies pixels only when a step changes them."""
    _check_size(image.size, max_pixels)  # before any pixel is decoded
    image.load()  # the first frame; raises on truncated data
    if image.readonly:  # pixels memory-mapped from the file (uncompressed formats): detach them
        image = image.copy()
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a new image: a caller's image is left as it was
    return _to_rgb(image)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(a decompression bomb, or raise max_pixels)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


# --------------------------------------------------------------------------------------------
# Grid choice and resizing (pure functions of the sizes)
# --------------------------------------------------------------------------------------------


def supported_grids(max_tiles: int) -> list[tuple[int, int]]:
    """All grids (rows, cols) with rows * cols <= max_tiles."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles={max_tiles} must be >= 1")
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]


def best_grid(size: tuple[int, int], tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The tile grid (rows, cols) for an image of ``size = (height, width)`` pixels.

    Least upscaling if some canvas can take the image at scale >= 1, else least downscaling;
    ties broken by the smallest canvas. See the module docstring for the sources.
    """
    height, width = size
    if height <= 0 or width <= 0 or tile_size <= 0:
        raise ValueError(f"sizes must be positive: size={size}, tile_size={tile_size}")
    grids = supported_grids(max_tiles)
    scales = {g: min(Fraction(g[0] * tile_size, height), Fraction(g[1] * tile_size, width)) for g in grids}
    upscales = [s for s in scales.values() if s >= 1]
    chosen = min(upscales) if upscales else max(scales.values())
    return min((g for g in grids if scales[g] == chosen), key=lambda g: g[0] * g[1])


def fit_size(size: tuple[int, int], grid: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """(height, width) to resize an image of ``size = (height, width)`` to before padding.

    The canvas is ``grid * tile_size``; each side may grow only up to one tile side (so a small
    image is not blown up to a large canvas), and the aspect ratio is kept.
    """
    height, width = size
    # Cap the upscaling: a side may grow to tile_size at most, and never beyond the canvas.
    target_h = min(max(height, tile_size), grid[0] * tile_size)
    target_w = min(max(width, tile_size), grid[1] * tile_size)
    # Fit inside (target_h, target_w) keeping the aspect ratio; float64 floor as in the reference.
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def normalize(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]: ``(x / 255 - 0.5) / 0.5``."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)
    # Same operations, in the same order, as torchvision's ToTensor + Normalize(0.5, 0.5).
    return x.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def preprocess_image(
    source: ImageSource, *, tile_size: int = 336, max_tiles: int = 16, max_pixels: int = MAX_PIXELS
) -> ImageInput:
    """Load an image and turn it into tiles for the vision tower.

    ``tile_size`` and ``max_tiles`` are ``VisionConfig.image_size`` and ``VisionConfig.max_tiles``;
    ``max_pixels`` as in :func:`load_image`. Raises :class:`ImageError` for bad input.
    """
    image = load_image(source, max_pixels=max_pixels)
    height, width = image.height, image.width
    rows, cols = best_grid((height, width), tile_size, max_tiles)
    new_h, new_w = fit_size((height, width), (rows, cols), tile_size)

    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = torch.full((3, rows * tile_size, cols * tile_size), -1.0)  # black after normalisation
    canvas[:, :new_h, :new_w] = normalize(resized)
    tiles = (
        canvas.view(3, rows, tile_size, cols, tile_size)
        .permute(1, 3, 0, 2, 4)  # (rows, cols, 3, S, S)
        .reshape(rows * cols, 3, tile_size, tile_size)
    )
    if rows * cols > 1:
        thumbnail = normalize(image.resize((tile_size, tile_size), Image.Resampling.BILINEAR))
        tiles = torch.cat([tiles, thumbnail[None]], dim=0)
    return ImageInput(pixel_values=tiles, grid=(rows, cols))
