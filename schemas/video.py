"""Video tables: source rows and clip rows as they flow through the video pipeline.

Version 1. Every stage declares which of these fields it adds; the pipeline's
sink writes the final clip table from them. Frames travel between stages as
`.npy` bytes (uint8, N x H x W x 3, RGB), loaded with allow_pickle=False.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

VIDEO_SCHEMA_VERSION = 1

# Discovered input files (one row per file, before any stage).
SOURCE_FIELDS = [
    pa.field("item_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("item_kind", pa.string()),
    pa.field("path", pa.string()),
    pa.field("size_bytes", pa.int64()),
]

PROBE_FIELDS = [
    pa.field("container", pa.string()),
    pa.field("codec", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("fps", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("num_frames", pa.int64()),
]

SHOT_TYPE = pa.struct([pa.field("start_frame", pa.int64()), pa.field("end_frame", pa.int64())])
SHOTS_FIELDS = [
    pa.field("shots", pa.list_(SHOT_TYPE)),  # end_frame exclusive
    pa.field("shot_detector", pa.string()),
]

# A clip row, as the clips (expand) stage creates it.
CLIP_FIELDS = [
    pa.field("item_id", pa.string()),  # clip id
    pa.field("parent_id", pa.string()),  # source id
    pa.field("source_id", pa.string()),
    pa.field("item_kind", pa.string()),
    pa.field("path", pa.string()),  # the source file
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("start_frame", pa.int64()),
    pa.field("end_frame", pa.int64()),  # exclusive
    pa.field("fps", pa.float64()),
    pa.field("width", pa.int32()),  # source resolution
    pa.field("height", pa.int32()),
    pa.field("clip_path", pa.string()),  # mp4 written by the clips stage, or null
    pa.field("frames", pa.binary()),  # analysis frames as .npy bytes
    pa.field("frame_times", pa.list_(pa.float64())),  # seconds in the source
    pa.field("frame_scale", pa.float64()),  # analysis width / source width
    pa.field("content_hash", pa.string()),  # sha256 of the decoded analysis frames
]

CROP_FIELDS = [
    pa.field("crop_x", pa.int32()),  # source pixel coordinates
    pa.field("crop_y", pa.int32()),
    pa.field("crop_w", pa.int32()),
    pa.field("crop_h", pa.int32()),
]

QUALITY_FIELDS = [
    pa.field("clarity", pa.float64()),
    pa.field("motion", pa.float64()),
    pa.field("instability", pa.float64()),
]

KEYFRAME_FIELDS = [
    pa.field("keyframe_times", pa.list_(pa.float64())),
    pa.field("keyframe_paths", pa.list_(pa.string())),
]

EMBED_FIELDS = [
    pa.field("phashes", pa.list_(pa.uint64())),
    pa.field("embedding", pa.list_(pa.float32())),
]


def encode_frames(frames: np.ndarray) -> bytes:
    """uint8 N x H x W x 3 frames as .npy bytes."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 NxHxWx3, got {frames.dtype} {frames.shape}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    """The inverse of encode_frames; never unpickles."""
    return np.load(io.BytesIO(data), allow_pickle=False)
