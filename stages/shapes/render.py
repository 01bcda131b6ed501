"""Draw a scene pixel-exactly: a pixel takes a shape's colour when its centre lies inside.

No anti-aliasing, so every pixel is the background or one palette colour and the
detector reads a clean render back exactly. Shapes are tested analytically at pixel
centres (a circle by distance, the rest as polygons by even-odd ray casting), which
gives the same pixels on every machine and library version. `degrade` blurs and
adds noise, to see how the detector copes with what a VAE gives back.
"""

from __future__ import annotations

import io
import math

import numpy as np

from weft.stages.shapes.scene import BACKGROUNDS, PALETTE, Obj, Scene

RENDER_VERSION = "1"
STAR_INNER = 0.5  # inner / outer radius of the five-pointed star (fat enough at 10 px)
_STAR_H = 1 + math.cos(math.radians(36))  # star height / outer radius
_STAR_W = 2 * math.sin(math.radians(72))  # star width / outer radius


def polygon(obj: Obj) -> np.ndarray:
    """The outline of a polygonal shape as (n, 2) x, y vertices filling its box."""
    x0, y0, x1, y1 = obj.box
    cx, cy = obj.x, obj.y
    if obj.shape == "square":
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif obj.shape == "diamond":
        pts = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    elif obj.shape == "triangle":
        pts = [(cx, y0), (x1, y1), (x0, y1)]
    elif obj.shape == "star":
        radius = obj.size / _STAR_W
        # the star's own centre sits below its box centre (its tip is taller than its feet)
        oy = y0 + radius
        pts = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * STAR_INNER
            angle = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(angle), oy + r * math.sin(angle)))
    else:
        raise ValueError(f"{obj.shape!r} is not a polygon shape")
    return np.asarray(pts, dtype=np.float64)


def _inside_polygon(pts: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    inside = np.zeros(np.broadcast(px, py).shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        crosses = (ya > py) != (yb > py)
        if ya == yb:
            continue
        x_at = xa + (py - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (px < x_at)
    return inside


def object_mask(obj: Obj, image_size: int) -> np.ndarray:
    """The pixels the object covers, as a boolean image."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    x0, y0, x1, y1 = (math.floor(v) for v in obj.box)
    xa, ya = max(0, x0 - 1), max(0, y0 - 1)
    xb, yb = min(image_size, x1 + 2), min(image_size, y1 + 2)
    if xa >= xb or ya >= yb:
        return mask
    px = np.arange(xa, xb, dtype=np.float64)[None, :] + 0.5
    py = np.arange(ya, yb, dtype=np.float64)[:, None] + 0.5
    if obj.shape == "circle":
        r = obj.size / 2
        part = (px - obj.x) ** 2 + (py - obj.y) ** 2 <= r * r
    else:
        part = _inside_polygon(polygon(obj), px, py)
    mask[ya:yb, xa:xb] = part
    return mask


def render(scene: Scene) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB image; later objects are drawn over earlier."""
    side = scene.image_size
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        image[object_mask(obj, side)] = PALETTE[obj.colour]
    return image


def degrade(image: np.ndarray, rng: np.random.Generator, blur_sigma: float = 0.0,
            noise_std: float = 0.0) -> np.ndarray:
    """Gaussian blur (sigma in pixels) then Gaussian noise (std in 0-255 units)."""
    import cv2

    out = image.astype(np.float32)
    if blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur_sigma, borderType=cv2.BORDER_REFLECT)
    if noise_std > 0:
        out = out + rng.normal(0.0, noise_std, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB image (deterministic: no timestamps)."""
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def read_image(data: bytes) -> np.ndarray:
    """Any encoded image as (H, W, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


__all__ = ["RENDER_VERSION", "degrade", "object_mask", "png_bytes", "polygon", "read_image",
           "render"]
