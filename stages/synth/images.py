"""Image bytes in and out of synthesis: safe local reads, model-sized pixels, PNG, measures.

Samples keep an image's original bytes (what goes into shards); models get
uint8 RGB arrays no larger than a configured side, so requests stay small and
their cache keys (which hash the pixels) stay stable from run to run.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from weft.stages.base import ItemError
from weft.stages.video.embed import phash
from weft.stages.web.images import decode_image, read_local

NO_MATCH = 64  # pHash distance recorded when there is nothing to compare with


def read_image_file(path: str | Path, root: str | Path, max_bytes: int, max_pixels: int
                    ) -> tuple[bytes, int, int]:
    """(bytes, width, height) of a local image confined to `root`, size-capped and fully
    decodable.

    Raises ItemError with the web loader's reason codes (path_escape, image_missing,
    too_large, decompression_bomb, image_undecodable, ...).
    """
    try:
        data = read_local(path, root, max_bytes)
    except Exception as exc:
        raise ItemError(getattr(exc, "reason", "image_unreadable"), str(exc)) from exc
    width, height = check_image_bytes(data, max_pixels)
    return data, width, height


def check_image_bytes(data: bytes | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) when the bytes fully decode within the pixel cap; ItemError otherwise."""
    if not data:
        raise ItemError("empty_image", "no image bytes")
    try:
        width, height, _, _ = decode_image(data, max_pixels)
    except Exception as exc:
        raise ItemError(getattr(exc, "reason", "image_undecodable"), str(exc)) from exc
    return width, height


def to_rgb(data: bytes) -> np.ndarray:
    """Decoded RGB uint8 H x W x 3 (transparency composited on white)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.asarray(im.convert("RGB"))


def fit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down (area interpolation) so its longer side is at most max_side."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return np.ascontiguousarray(rgb)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))


def model_pixels(data: bytes, max_side: int) -> np.ndarray:
    """What a VLM request carries for an image: RGB uint8, longer side <= max_side."""
    return fit_side(to_rgb(data), max_side)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG",
                                                                     optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageMeasure:
    """Rule inputs for one image: size, grayscale spread and pHash (None when flat)."""

    width: int
    height: int
    std: float
    phash: int | None

    @property
    def min_side(self) -> int:
        return min(self.width, self.height)


def measure(data: bytes, flat_std: float = 2.0) -> ImageMeasure:
    """Measure an image's bytes; a flat image (std < flat_std) gets no pHash (all blanks
    hash alike)."""
    rgb = to_rgb(data)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    std = float(gray.std())
    return ImageMeasure(width=rgb.shape[1], height=rgb.shape[0], std=round(std, 6),
                        phash=phash(gray) if std >= flat_std else None)


def mean_abs_difference(a: bytes, b: bytes, side: int = 64) -> float:
    """Mean absolute pixel difference (0-255) of two images resized to side x side."""
    small = [cv2.resize(to_rgb(x), (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
             for x in (a, b)]
    return round(float(np.abs(small[0] - small[1]).mean()), 6)
