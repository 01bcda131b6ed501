"""Border and overlay cropping on synthetic arrays: the geometry and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from weft.schemas.video import encode_frames
from weft.stages.base import DECISION_COLUMN
from weft.stages.video.crop import (
    CropConfig,
    CropStage,
    Rect,
    detect_borders,
    detect_logos,
    largest_free_rect,
    plan_crop,
    sample_indices,
    text_regions,
)

NO_OCR = CropConfig(use_ocr=False)


def textured(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Moving, textured content: every line varies over space and time."""
    rng = np.random.default_rng(seed)
    return rng.integers(30, 226, size=(n, h, w, 3), dtype=np.uint8)


def bordered(content: np.ndarray, top: int, bottom: int, left: int, right: int,
             colour: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    n, h, w, _ = content.shape
    out = np.empty((n, h + top + bottom, w + left + right, 3), dtype=np.uint8)
    out[:] = np.array(colour, dtype=np.uint8)
    out[:, top:top + h, left:left + w] = content
    return out


@pytest.mark.parametrize("top,bottom,left,right", [
    (20, 20, 0, 0), (0, 0, 32, 32), (12, 30, 8, 50), (1, 0, 0, 2), (0, 0, 0, 0)])
def test_borders_are_found_exactly_on_clean_bars(top: int, bottom: int, left: int,
                                                 right: int) -> None:
    frames = bordered(textured(4, 90, 160), top, bottom, left, right)
    assert detect_borders(frames, NO_OCR) == Rect(left, top, 160, 90)


def test_border_of_any_constant_colour_and_mixed_colours() -> None:
    grey = bordered(textured(3, 80, 120), 10, 10, 0, 0, colour=(60, 60, 60))
    assert detect_borders(grey) == Rect(0, 10, 120, 80)
    # Bars of different colours on the two axes do not hide each other.
    mixed = bordered(bordered(textured(3, 80, 120), 0, 0, 16, 16, (0, 0, 0)),
                     8, 8, 0, 0, (200, 30, 30))
    assert detect_borders(mixed) == Rect(16, 8, 120, 80)


def test_codec_ringing_at_the_bar_edge_is_tolerated() -> None:
    rng = np.random.default_rng(1)
    frames = bordered(textured(4, 90, 160), 24, 24, 0, 0).astype(np.int16)
    for row in (20, 21, 22, 23, 90 + 24, 90 + 25):  # noisy lines next to the picture
        frames[:, row] += rng.integers(-6, 7, size=frames[:, row].shape, dtype=np.int16)
    rect = detect_borders(np.clip(frames, 0, 255).astype(np.uint8))
    assert abs(rect.y - 24) <= 4 and abs(rect.y1 - (24 + 90)) <= 4
    assert rect.x == 0 and rect.w == 160


def test_dark_smooth_content_is_not_a_border() -> None:
    """A night sky: dark and smooth, but not constant over space and time."""
    rng = np.random.default_rng(2)
    n, h, w = 6, 120, 200
    sky = np.linspace(4, 28, w)[None, None, :, None] + rng.normal(0, 3, size=(n, h, w, 1))
    frames = np.clip(np.repeat(sky, 3, axis=-1), 0, 255).astype(np.uint8)
    frames[:, 60:] = textured(n, 60, w)
    assert detect_borders(frames) == Rect(0, 0, w, h)


def test_a_bar_that_changes_over_time_is_not_a_border() -> None:
    frames = bordered(textured(4, 60, 100), 10, 0, 0, 0)
    frames[2, :10] = 90  # one frame shows picture where the others were flat
    assert detect_borders(frames).y == 0


def test_all_black_single_and_tiny_frames_do_not_crash() -> None:
    black = np.zeros((5, 72, 128, 3), dtype=np.uint8)
    assert detect_borders(black) == Rect(0, 0, 128, 72)
    plan = plan_crop(black, [], NO_OCR)
    assert plan.rect == Rect(0, 0, 128, 72) and plan.scores["kept_area_fraction"] == 1.0
    single = bordered(textured(1, 40, 64), 6, 6, 0, 0)[0]  # H×W×3
    assert detect_borders(single) == Rect(0, 6, 64, 40)
    for shape in [(1, 1, 1, 3), (2, 3, 2, 3), (1, 8, 8, 3)]:
        tiny = np.full(shape, 17, dtype=np.uint8)
        plan = plan_crop(tiny, [Rect(0, 0, 1, 1)], CropConfig(use_ocr=False))
        assert plan.rect.area > 0
        assert 0 <= plan.scores["overlay_area_fraction"] <= 1
    with pytest.raises(ValueError):
        detect_borders(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_largest_free_rect_avoids_edge_boxes_at_least_cost() -> None:
    area = Rect(0, 0, 640, 272)
    assert largest_free_rect(area, []) == area
    subtitle = Rect(160, 230, 320, 30)
    assert largest_free_rect(area, [subtitle]) == Rect(0, 0, 640, 230)
    corner_logo = Rect(570, 8, 60, 40)  # cutting 70 columns beats cutting 48 rows
    assert largest_free_rect(area, [corner_logo]) == Rect(0, 0, 570, 272)
    both = largest_free_rect(area, [subtitle, corner_logo])
    assert both == Rect(0, 0, 570, 230)
    assert largest_free_rect(area, [Rect(-5, -5, 1000, 1000)]).area == 0


def test_plan_crops_edge_text_and_scores_centre_text() -> None:
    frames = textured(4, 100, 200)
    edge = plan_crop(frames, [Rect(40, 85, 120, 12)], NO_OCR)
    assert edge.rect.y1 <= 85 - NO_OCR.box_margin and edge.rect.w == 200
    assert edge.scores["overlay_area_fraction"] == 0.0
    assert edge.scores["num_text_boxes"] == 1
    assert 0.8 < edge.scores["kept_area_fraction"] < 0.9
    centre = plan_crop(frames, [Rect(50, 40, 100, 20)], NO_OCR)
    assert centre.rect == Rect(0, 0, 200, 100)
    assert centre.scores["overlay_area_fraction"] == pytest.approx(104 * 24 / 20000)
    assert len(centre.remaining_boxes) == 1 and not centre.cropped_boxes


def test_plan_maps_analysis_pixels_to_source_pixels() -> None:
    frames = bordered(textured(3, 60, 120), 10, 10, 20, 20)  # analysis 160×80
    plan = plan_crop(frames, [], NO_OCR, scale_x=4.0, scale_y=4.0, source_size=(640, 320))
    assert plan.rect == Rect(80, 40, 480, 240)
    assert plan.scores["border_top"] == 40 and plan.scores["border_bottom"] == 40
    assert plan.scores["border_left"] == 80 and plan.scores["border_right"] == 80
    assert plan.scores["kept_area_fraction"] == pytest.approx(480 * 240 / (640 * 320))


def test_subtitle_inside_a_bar_takes_the_rest_of_the_bar_with_it() -> None:
    frames = bordered(textured(4, 80, 160), 0, 30, 0, 0)
    frames[:, 95:105, 50:110] = 255  # white text in the bottom bar
    rect = detect_borders(frames)
    assert rect.y1 == 105  # the flat rows under the text are all that is flat
    plan = plan_crop(frames, [Rect(50, 95, 60, 10)], NO_OCR)
    assert plan.rect == Rect(0, 0, 160, 80)


def test_static_corner_logo_is_found_only_when_the_scene_moves() -> None:
    frames = textured(6, 120, 200, seed=3)
    rng = np.random.default_rng(4)
    logo = rng.integers(0, 2, size=(16, 24, 1), dtype=np.uint8) * 255
    frames[:, 6:22, 168:192] = logo
    found = detect_logos(frames, Rect(0, 0, 200, 120))
    assert len(found) == 1
    box = found[0]
    assert abs(box.x - 168) <= 2 and abs(box.y - 6) <= 2 and abs(box.x1 - 192) <= 2
    plan = plan_crop(frames, [], NO_OCR)
    assert plan.rect.intersect(Rect(168, 6, 24, 16)).area == 0
    static = np.repeat(frames[:1], 6, axis=0)  # a still scene gives no evidence
    assert detect_logos(static, Rect(0, 0, 200, 120)) == []
    assert detect_logos(frames[:2], Rect(0, 0, 200, 120)) == []


def test_text_regions_keep_what_stays_and_set_aside_what_passes() -> None:
    caption = [Rect(10, 80, 100, 12), Rect(12, 81, 60, 12), Rect(8, 80, 140, 13)]
    sign = Rect(150, 20, 30, 10)  # in one frame only: scene text going by
    second_line = Rect(10, 95, 90, 12)  # below the caption, in two frames
    per_frame = [[caption[0], sign], [caption[1], second_line], [caption[2], second_line]]
    persistent, transient = text_regions(per_frame, min_frames=2)
    assert persistent == [Rect(8, 80, 140, 13), second_line]
    assert transient == [sign]
    # Fewer frames read than required: what was seen counts.
    assert text_regions([[sign]], min_frames=2) == ([sign], [])
    assert text_regions([], min_frames=2) == ([], [])


def test_sample_indices_spread_over_the_clip() -> None:
    assert sample_indices(8, 3) == [1, 4, 6]
    assert sample_indices(2, 3) == [0, 1]
    assert sample_indices(0, 3) == []


def test_config_defaults_and_validation() -> None:
    config = CropConfig()
    assert config.resources.cpus == 1 and config.resources.concurrency == 1
    assert config.resources.batch_size == 4
    assert config.use_ocr and config.ocr_frames == 3 and config.edge_band == 0.3
    with pytest.raises(ValueError):
        CropConfig(edge_band=0.6)
    with pytest.raises(ValueError):
        CropConfig(unknown_knob=1)


def _row(frames: np.ndarray, width: int, height: int, item_id: str = "clip-1") -> dict:
    return {"item_id": item_id, "source_id": "src", "parent_id": "src", "item_kind": "clip",
            "frames": encode_frames(frames), "frame_scale": frames.shape[2] / width,
            "width": width, "height": height}


def test_stage_scores_and_the_policy_decides(run_context) -> None:
    ctx = run_context({"crop": {"kept_area_fraction": {"min": 0.5},
                                 "overlay_area_fraction": {"max": 0.05}}})
    stage = CropStage(NO_OCR, ctx)
    assert stage.model_identity() == (None, None)
    letterbox = bordered(textured(4, 60, 160), 10, 10, 0, 0)  # source 320×160 at half scale
    heavy = bordered(textured(4, 30, 60), 25, 25, 50, 50)  # 60×30 picture in a 160×80 frame
    rows = [_row(letterbox, 320, 160, "a"), _row(heavy, 320, 160, "b"),
            {"item_id": "c", "frames": None, "width": 320, "height": 160},
            {"item_id": "d", "frames": b"not npy", "width": 320, "height": 160}]
    out = {r["item_id"]: r for r in stage.process_rows(rows)}
    a = out["a"]
    assert a[DECISION_COLUMN] == "keep"
    assert (a["crop_x"], a["crop_y"], a["crop_w"], a["crop_h"]) == (0, 20, 320, 120)
    assert out["b"][DECISION_COLUMN] == "drop"
    assert '"reason":"kept_area_fraction_below_min"' in out["b"]["_ledger"][-1]
    assert out["c"][DECISION_COLUMN] == "error" and "frames_missing" in out["c"]["_ledger"][-1]
    assert out["d"][DECISION_COLUMN] == "error" and "frames_unreadable" in out["d"]["_ledger"][-1]
