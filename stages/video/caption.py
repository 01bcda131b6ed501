"""Frame-transition captions: a clip's key frames interleaved with what changed between them.

Two stages around one inference step (BAGEL's interleaved video data):

- `caption_prep` (CPU): reads a kept clip's key frames, resizes them for the
  VLM and passes the pixels on; a clip with fewer than two readable key frames
  cannot be captioned (policy `caption_prep.num_keyframes`).
- the pipeline then asks the registry's VLM, through the request cache, for one
  caption per consecutive pair (prompt `configs/prompts/<prompt>.yaml`);
- `caption` (CPU): caps each caption at `max_caption_tokens` (cut at a word
  boundary, recorded), scores empty, repeated and over-long outputs for the
  policy, and builds the interleaved sample
  frame0, caption(0→1), frame1, caption(1→2), ...

Model id, revision, prompt hash, token counts and latency per caption go in
the ledger.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from weft.schemas.ids import hash_of
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig
from weft.stages.infer.prompts import PromptTemplate
from weft.stages.infer.runner import decode_image, encode_image
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams
from weft.stages.video.quality import resize_short_side

CAPTION_PREP_FIELDS = [
    pa.field("caption_frames", pa.list_(pa.binary())),  # resized key frames, .npy bytes
]
SAMPLE_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_tokens", pa.list_(pa.int32())),
    pa.field("caption_truncated", pa.list_(pa.bool_())),
    pa.field("sequence", pa.string()),  # the interleaved items, JSON
    pa.field("caption_model", pa.string()),
    pa.field("caption_model_revision", pa.string()),
    pa.field("caption_prompt", pa.string()),
    pa.field("caption_prompt_hash", pa.string()),
]
_WORD = re.compile(r"\w+", re.UNICODE)


class CaptionConfig(StageConfig):
    """Which model and prompt caption transitions, and how long a caption may be."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4))
    model: str = Field("caption-vlm", description="a name in the model registry")
    prompt: str = Field("caption_transition", description="configs/prompts/<prompt>.yaml")
    max_caption_tokens: int = Field(30, ge=1, description="longer captions are cut at a word")
    image_max_side: int = Field(448, ge=28, description="key frames are resized to this long "
                                                        "side before they reach the VLM")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (reproducible)")
    seed: int = 0

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_caption_tokens,
                              seed=self.seed)


def resize_long_side(frame: np.ndarray, side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if max(h, w) <= side:
        return frame
    scale = side / max(h, w)
    short = max(1, round(min(h, w) * scale))
    return resize_short_side(frame, short)


class CaptionPrepStage(Stage):
    """Load and resize a clip's key frames for the VLM (CPU; no model here)."""

    name = "caption_prep"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = CaptionConfig
    input_columns = ("keyframe_paths", "keyframe_times")
    output_fields = CAPTION_PREP_FIELDS
    heavy_columns = ("caption_frames",)

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: CaptionConfig = self.config  # type: ignore[assignment]
        paths = list(row.get("keyframe_paths") or [])
        times = list(row.get("keyframe_times") or [])
        if len(paths) != len(times):
            raise ItemError("bad_keyframes", f"{len(paths)} key frame paths, {len(times)} times")
        frames = []
        for rel in paths:
            path = Path(self.ctx.run_dir) / rel
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ItemError("keyframe_unreadable", f"cannot read key frame {rel}")
            rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            frames.append(encode_image(resize_long_side(rgb, config.image_max_side)))
        scores = {"num_keyframes": len(frames)}
        return [Outcome(self.entry(row, scores), {"caption_frames": frames})]


def transition_requests(row: dict[str, Any], prompt: PromptTemplate,
                        sampling: SamplingParams) -> list[ChatRequest]:
    """One request per consecutive pair of a prepared clip's key frames."""
    frames = [decode_image(b) for b in row["caption_frames"]]
    times = list(row["keyframe_times"])
    return [ChatRequest(messages=prompt.messages(images=2,
                                                 delta_s=f"{times[i + 1] - times[i]:.1f}"),
                        images=[frames[i], frames[i + 1]], sampling=sampling,
                        prompt_id=prompt.ref, prompt_hash=prompt.prompt_hash)
            for i in range(len(frames) - 1)]


def cap_at_word(text: str, completion_tokens: int, finish_reason: str,
                max_tokens: int) -> tuple[str, bool]:
    """(caption, truncated): a caption that ran into the cap loses its last, cut word."""
    text = " ".join(text.split())
    if finish_reason != "length" and completion_tokens <= max_tokens:
        return text, False
    cut = text.rsplit(" ", 1)[0] if " " in text else text
    return cut.rstrip(" ,;:-"), True


def is_degenerate(text: str) -> bool:
    """A caption that repeats itself: few distinct words, or one word 4+ times in a row."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 6 and len(set(words)) / len(words) < 0.4:
        return True
    return any(len({*words[i:i + 4]}) == 1 for i in range(max(0, len(words) - 3)))


class CaptionStage(Stage):
    """Score a clip's transition captions and build its interleaved sample."""

    name = "caption"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = CaptionConfig
    input_columns = ("keyframe_paths", "keyframe_times", "caption_completions")
    output_fields = SAMPLE_FIELDS
    # Set by the pipeline from the registry and the prompt before rows are processed.
    model_id: str = ""
    model_revision: str = ""
    prompt: PromptTemplate | None = None

    def model_identity(self) -> tuple[str | None, str | None]:
        return self.model_id, self.model_revision

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: CaptionConfig = self.config  # type: ignore[assignment]
        assert self.prompt is not None, "the pipeline sets the prompt"
        completions = [Completion.from_json(json.loads(c)) for c in row["caption_completions"]]
        errors = [c.error for c in completions if c.error]
        if errors:
            raise ItemError("inference_failed", f"{len(errors)} of {len(completions)} captions "
                            f"failed: {errors[0]}")
        times = list(row["keyframe_times"])
        paths = list(row["keyframe_paths"])
        captions, truncated = [], []
        for c in completions:
            text, cut = cap_at_word(c.text, c.completion_tokens, c.finish_reason,
                                    config.max_caption_tokens)
            captions.append(text)
            truncated.append(cut)
        n = max(1, len(captions))
        seen: set[str] = set()
        repeated = 0
        for text in captions:
            repeated += bool(text) and (text.lower() in seen or is_degenerate(text))
            seen.add(text.lower())
        scores = {"num_captions": len(captions),
                  "empty_fraction": round(sum(not t for t in captions) / n, 6),
                  "repeated_fraction": round(repeated / n, 6),
                  "truncated_fraction": round(sum(truncated) / n, 6)}
        sequence: list[dict[str, Any]] = []
        for i, path in enumerate(paths):
            sequence.append({"type": "video_frame", "path": path, "time_s": times[i]})
            if i < len(captions):
                sequence.append({"type": "text", "role": "caption", "text": captions[i],
                                 "from_s": times[i], "to_s": times[i + 1]})
        details = {"captions": [{"text": t, "raw": c.text, "prompt_tokens": c.prompt_tokens,
                                 "completion_tokens": c.completion_tokens,
                                 "finish_reason": c.finish_reason, "truncated": cut,
                                 "latency_ms": c.latency_ms}
                                for t, c, cut in zip(captions, completions, truncated,
                                                     strict=True)]}
        out = {"sample_id": hash_of("video_sample", row["item_id"], self.model_id,
                                    self.model_revision, self.prompt.prompt_hash),
               "captions": captions,
               "caption_tokens": [c.completion_tokens for c in completions],
               "caption_truncated": truncated,
               "sequence": json.dumps(sequence, sort_keys=True),
               "caption_model": self.model_id, "caption_model_revision": self.model_revision,
               "caption_prompt": self.prompt.ref, "caption_prompt_hash": self.prompt.prompt_hash}
        entry = self.entry(row, scores, details=details)
        entry.prompt_hash = self.prompt.prompt_hash
        return [Outcome(entry, out)]
