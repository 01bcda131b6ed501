"""Embed: perceptual hashes and a semantic embedding per clip, for global dedup.

- `phashes`: a 64-bit DCT pHash of up to `phash_frames` evenly spaced cropped
  analysis frames (grayscale, 32×32, 2-D DCT, the 8×8 lowest frequencies,
  thresholded at their median; bit 0 is the DC term, stored as the most
  significant bit). pHashes survive re-encoding, resizing and small colour
  shifts, so dedup can match frames across copies of a video. Nearly flat frames
  (black, fades) are skipped: they all hash alike and would match every other
  clip's fades.
- `embedding`: the L2-normalised mean of open_clip image embeddings of the key
  frames (or of `embed_frames` evenly spaced frames when key frames are
  absent), renormalised. With `model_dir: null` the column is null and the
  semantic dedup tier scores 0.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field

from weft.schemas.video import EMBED_FIELDS
from weft.stages.base import Outcome, Resources, Stage, StageConfig
from weft.stages.video.open_clip_model import OpenClipImageModel, load_open_clip
from weft.stages.video.quality import cropped_frames, to_gray

_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


class EmbedConfig(StageConfig):
    """Where the image model lives and how many frames are hashed and embedded."""

    resources: Resources = Field(
        default_factory=lambda: Resources(cpus=1, concurrency=1, batch_size=8))
    model_dir: str | None = Field(None, description="local open_clip directory "
                                  "(open_clip_config.json + weights); null disables embeddings")
    device: str = Field("cpu", description="torch device for the image model, e.g. cuda")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    phash_frames: int = Field(16, ge=1, description="at most this many frames are pHashed")
    phash_min_std: float = Field(2.0, ge=0, description="frames whose grayscale std is "
                                                        "below this are flat and not hashed")
    embed_frames: int = Field(4, ge=1, description="frames embedded when there are no key frames")


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB or grayscale uint8 image."""
    gray = image if image.ndim == 2 else to_gray(image)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = (low > np.median(low)).astype(np.uint64)
    return int((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread over range(n), first and last included (all when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(float(i)) for i in np.linspace(0, n - 1, k)})


def clip_phashes(frames: np.ndarray, max_frames: int = 16,
                 min_std: float = 2.0) -> tuple[list[int], int]:
    """(hashes of non-flat frames among up to `max_frames` evenly spaced ones, flat count)."""
    hashes: list[int] = []
    flat = 0
    for i in evenly_spaced(len(frames), max_frames):
        gray = to_gray(frames[i])
        if float(gray.std()) < min_std:
            flat += 1
            continue
        hashes.append(phash(gray))
    return hashes, flat


def embed_indices(row: dict[str, Any], num_frames: int, fallback: int) -> list[int]:
    """Frames to embed: those nearest the key frame times, else evenly spaced ones."""
    times = np.asarray(row.get("frame_times") or [], dtype=np.float64)
    keys = row.get("keyframe_times") or []
    if keys and len(times) == num_frames:
        return sorted({int(np.argmin(np.abs(times - t))) for t in keys})
    return evenly_spaced(num_frames, fallback)


class EmbedStage(Stage):
    """pHash and embed each clip (policy block `embed`: num_phashes, flat_frames)."""

    name = "embed"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = EmbedConfig
    input_columns = ("frames", "frame_times", "frame_scale", "keyframe_times", "crop_x",
                     "crop_y", "crop_w", "crop_h")
    heavy_columns = ("frames",)  # a dropped clip does not carry its pixels on
    output_fields = EMBED_FIELDS
    uses_model = True

    model: OpenClipImageModel | None = None

    def setup(self) -> None:
        """Load the image model once per worker; a missing or broken model_dir fails here."""
        config: EmbedConfig = self.config  # type: ignore[assignment]
        self.model = None if config.model_dir is None else load_open_clip(
            config.model_dir, device=config.device)

    def model_identity(self) -> tuple[str | None, str | None]:
        if self.model is None:
            return None, None
        return self.model.model_id, self.model.revision

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: EmbedConfig = self.config  # type: ignore[assignment]
        frames = cropped_frames(row)
        hashes, flat = clip_phashes(frames, config.phash_frames, config.phash_min_std)
        embedding: list[float] | None = None
        details: dict[str, Any] = {}
        if self.model is not None:
            indices = embed_indices(row, len(frames), config.embed_frames)
            feats = self.model.encode([frames[i] for i in indices], config.batch_size)
            mean = feats.mean(axis=0)
            mean /= max(float(np.linalg.norm(mean)), 1e-12)
            embedding = [float(x) for x in mean.astype(np.float32)]
            details["embedded_frames"] = indices
        scores = {"num_phashes": len(hashes), "flat_frames": flat}
        out = {"phashes": hashes, "embedding": embedding}
        return [Outcome(self.entry(row, scores, details=details), out)]
