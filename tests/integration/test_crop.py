"""The crop stage on real videos: padded with ffmpeg, text burnt in, the real OCR model.

Every clip is made in the test from a real asset, so the truth (where the
picture is, where the text is) is known to the pixel; frames are decoded with
decord, at full and at half resolution, into the clip-row format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from weft.schemas.policy import Policy
from weft.schemas.video import CROP_FIELDS, encode_frames
from weft.stages.base import DECISION_COLUMN, RunContext
from weft.stages.video.crop import CropConfig, CropStage, Rect

decord = pytest.importorskip("decord")

pytestmark = pytest.mark.integration

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
TOLERANCE_PX = 4
POLICY = {"kept_area_fraction": {"min": 0.5}, "overlay_area_fraction": {"max": 0.05}}
# A source cut to even sizes first, so that padding adds exactly what the truth says.
EVEN = {"bikes.mp4": "null", "cityCC0.mpg": "crop=720:404:0:0", "Megamind.avi": "null"}


@pytest.fixture(scope="module")
def stage() -> CropStage:
    """The stage with its real OCR model, loaded once, under a policy that drops."""
    ctx = RunContext(run_id="crop-test", run_dir="/tmp/weft-crop-test", code_version="test",
                     policy=Policy(name="test", version=1, rules={"crop": POLICY}))
    stage = CropStage(CropConfig(), ctx)
    stage.ensure_setup()
    return stage


@pytest.fixture(scope="module")
def make_clip(tmp_path_factory, asset, ffmpeg) -> Callable[[str, str], Path]:
    """A 2.5 s H.264 clip of an asset through a filter chain (cached per chain)."""
    root = tmp_path_factory.mktemp("crop-clips")
    made: dict[tuple[str, str], Path] = {}

    def make(name: str, chain: str) -> Path:
        key = (name, chain)
        if key not in made:
            out = root / f"clip{len(made)}.mp4"
            ffmpeg("-t", "2.5", "-i", str(asset(name)), "-vf", f"{EVEN[name]},{chain}", "-an",
                   "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out))
            made[key] = out
        return made[key]

    return make


def clip_row(path: Path, scale: float = 1.0, n: int = 8) -> dict[str, Any]:
    """A clip row as the clips stage makes it: n analysis frames spread over the clip."""
    full = decord.VideoReader(str(path))
    height, width = full[0].shape[:2]
    size = {} if scale == 1.0 else {"width": round(width * scale) // 2 * 2,
                                    "height": round(height * scale) // 2 * 2}
    reader = decord.VideoReader(str(path), **size)
    count = len(reader)
    frames = reader.get_batch([int((i + 0.5) * count / n) for i in range(n)]).asnumpy()
    return {"item_id": f"{path.stem}@{scale}", "source_id": path.stem, "parent_id": path.stem,
            "item_kind": "clip", "frames": encode_frames(frames),
            "frame_scale": frames.shape[2] / width, "width": width, "height": height}


def crop_of(row: dict[str, Any]) -> Rect:
    return Rect(row["crop_x"], row["crop_y"], row["crop_w"], row["crop_h"])


def error_px(got: Rect, truth: Rect) -> int:
    return max(abs(got.x - truth.x), abs(got.y - truth.y),
               abs(got.x1 - truth.x1), abs(got.y1 - truth.y1))


def ink_box(ffmpeg, tmp_path: Path, size: str, drawtext: str) -> Rect:
    """Where drawtext puts ink: the same text drawn on black, thresholded."""
    out = tmp_path / "ink.png"
    ffmpeg("-f", "lavfi", "-i", f"color=black:s={size}:d=0.1", "-vf", drawtext,
           "-frames:v", "1", str(out))
    import cv2

    ys, xs = np.nonzero(cv2.imread(str(out), cv2.IMREAD_GRAYSCALE) > 60)
    return Rect(int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1))


# (asset, pad filter, picture rectangle in the padded source)
PADDED = [
    ("bikes.mp4", "pad=640:352:0:40", Rect(0, 40, 640, 272)),  # letterbox 40 / 40
    ("bikes.mp4", "pad=768:272:64:0", Rect(64, 0, 640, 272)),  # pillarbox 64 / 64
    ("bikes.mp4", "pad=740:340:36:50", Rect(36, 50, 640, 272)),  # both, asymmetric
    ("bikes.mp4", "pad=700:300:10:6:color=0x202020", Rect(10, 6, 640, 272)),  # thin, dark grey
    ("cityCC0.mpg", "pad=720:524:0:60", Rect(0, 60, 720, 404)),  # letterbox on a night scene
    ("cityCC0.mpg", "pad=850:460:96:22:color=0x303030", Rect(96, 22, 720, 404)),  # grey, both
    ("cityCC0.mpg", "pad=800:404:24:0:color=0x101010", Rect(24, 0, 720, 404)),  # near-black
    ("Megamind.avi", "pad=720:608:0:40", Rect(0, 40, 720, 528)),  # bar against a dim wall
]


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("name,pad,truth", PADDED, ids=[f"{a}:{p}" for a, p, _ in PADDED])
def test_padding_is_cropped_to_the_picture(stage, make_clip, name: str, pad: str, truth: Rect,
                                           scale: float) -> None:
    row = clip_row(make_clip(name, pad), scale)
    outcome = stage.process(row)[0]
    got = crop_of(outcome.row)
    assert error_px(got, truth) <= TOLERANCE_PX, f"{name} {pad} @ {scale}: {got} vs {truth}"
    scores = outcome.entry.scores
    assert abs(scores["border_top"] - truth.y) <= TOLERANCE_PX
    assert abs(scores["border_left"] - truth.x) <= TOLERANCE_PX
    assert outcome.entry.decision == "keep"
    assert outcome.entry.details["rect"] == got.as_list()


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("name", ["bikes.mp4", "cityCC0.mpg", "Megamind.avi"])
def test_unpadded_videos_are_not_cropped(stage, asset, name: str, scale: float) -> None:
    """The original files, not re-encoded: a dim wall and a night sky stay in the picture."""
    row = clip_row(asset(name), scale)
    outcome = stage.process(row)[0]
    assert crop_of(outcome.row) == Rect(0, 0, row["width"], row["height"])
    assert outcome.entry.scores["kept_area_fraction"] == 1.0
    assert outcome.entry.decision == "keep"


def text_filter(text: str, size: int, x: str, y: str, extra: str = "") -> str:
    return (f"drawtext=fontfile={FONT}:text='{text}':fontsize={size}:fontcolor=white"
            f":borderw=2:bordercolor=black:x={x}:y={y}{extra}")


def test_bottom_text_is_cropped_away(stage, make_clip, ffmpeg, tmp_path) -> None:
    draw = text_filter("Hello World 2024", 36, "(w-tw)/2", "h-th-12")
    ink = ink_box(ffmpeg, tmp_path, "640x272", draw)
    for scale in (1.0, 0.5):
        outcome = stage.process(clip_row(make_clip("bikes.mp4", draw), scale))[0]
        got = crop_of(outcome.row)
        assert got.intersect(ink).area == 0
        assert (got.x, got.y, got.w) == (0, 0, 640)
        assert ink.y - got.y1 <= 12, f"{got} cuts far above the text {ink}"
        assert outcome.entry.scores["num_text_boxes"] >= 1
        assert outcome.entry.scores["overlay_area_fraction"] == 0.0
        assert outcome.entry.decision == "keep"
        boxes = [Rect(*b) for b in outcome.entry.details["text_boxes"]]
        assert any(b.intersect(ink).area >= 0.8 * ink.area for b in boxes)


def test_top_text_is_cropped_away(stage, make_clip, ffmpeg, tmp_path) -> None:
    draw = text_filter("CITY LIGHTS", 40, "30", "16")
    ink = ink_box(ffmpeg, tmp_path, "720x404", draw)
    outcome = stage.process(clip_row(make_clip("cityCC0.mpg", draw), 0.5))[0]
    got = crop_of(outcome.row)
    assert got.intersect(ink).area == 0
    assert got.y - ink.y1 <= 12 and got.y1 == 404
    assert outcome.entry.scores["kept_area_fraction"] > 0.8
    assert outcome.entry.decision == "keep"


def test_subtitle_in_a_letterbox_bar_goes_with_the_bar(stage, make_clip) -> None:
    draw = text_filter("Subtitle in the bar", 30, "(w-tw)/2", "h-th-15")
    truth = Rect(0, 60, 720, 404)
    for scale in (1.0, 0.5):
        outcome = stage.process(clip_row(make_clip("cityCC0.mpg", f"pad=720:524:0:60,{draw}"),
                                         scale))[0]
        got = crop_of(outcome.row)
        assert error_px(got, truth) <= TOLERANCE_PX, f"{got} vs {truth} @ {scale}"
        assert outcome.entry.scores["num_text_boxes"] >= 1


def test_centre_text_cannot_be_cropped_and_the_policy_drops_it(stage, make_clip) -> None:
    draw = text_filter("CENTER TEXT", 48, "(w-tw)/2", "(h-th)/2")
    rows = stage.process_rows([clip_row(make_clip("bikes.mp4", draw), 0.5)])
    row = rows[0]
    assert crop_of(row) == Rect(0, 0, 640, 272)
    assert row[DECISION_COLUMN] == "drop"
    import json

    entry = json.loads(row["_ledger"][-1])
    assert entry["reason"] == "overlay_area_fraction_above_max"
    assert json.loads(entry["scores"])["overlay_area_fraction"] > 0.05
    assert entry["model_id"] == "rapidocr-onnxruntime" and entry["model_revision"]


def test_static_corner_logo_is_cropped_away(stage, make_clip, asset, ffmpeg, tmp_path) -> None:
    out = tmp_path / "logo.mp4"
    ffmpeg("-t", "2.5", "-i", str(asset("bikes.mp4")), "-f", "lavfi", "-i",
           "smptebars=s=64x40:r=25", "-filter_complex", "[0:v][1:v]overlay=W-w-12:10:shortest=1",
           "-an", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out))
    logo = Rect(640 - 64 - 12, 10, 64, 40)
    outcome = stage.process(clip_row(out, 1.0))[0]
    got = crop_of(outcome.row)
    assert got.intersect(logo).area == 0
    assert outcome.entry.scores["num_logo_boxes"] == 1
    assert outcome.entry.scores["kept_area_fraction"] > 0.8, outcome.entry.details


def test_heavy_padding_is_dropped_and_the_batch_adapter_keeps_the_schema(stage,
                                                                       make_clip) -> None:
    rows = [clip_row(make_clip("bikes.mp4", "pad=1280:544:320:136"), 0.5),
            clip_row(make_clip("bikes.mp4", "pad=640:352:0:40"), 0.5)]
    table = pa.Table.from_pylist(rows)
    out = stage(table)
    for f in CROP_FIELDS:
        assert out.schema.field(f.name).type == pa.int32()
    got = out.to_pylist()
    assert got[0][DECISION_COLUMN] == "drop"
    assert "kept_area_fraction_below_min" in got[0]["_ledger"][-1]
    assert error_px(crop_of(got[0]), Rect(320, 136, 640, 272)) <= TOLERANCE_PX
    assert got[1][DECISION_COLUMN] == "keep"
