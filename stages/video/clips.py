"""Clips: cut a source video into clips along its shots, decoding it once.

Planning is pure (`plan_clips`), so too-short candidates are dropped with a
reason before any pixel is decoded. The kept clips are then extracted in one
forward pass with one decord `VideoReader`: frames are read in contiguous
chunks from frame 0 and never by seeking, because decord's seeks (and
`skip_frames`) land on the wrong frame in some AVI and MPEG files while a
straight read matches ffmpeg frame for frame. Each chunk feeds every clip it
overlaps: a few analysis frames for the later stages and, for mp4 output, all
frames piped into an ffmpeg encoder that writes `clips/<clip_id>.mp4`
atomically and byte-identically for identical input.

Reason codes: duration_s_below_min / duration_s_above_max (policy),
empty_clip, no_shots, bad_source_row, decode_failed, encode_failed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from weft.schemas.ids import clip_id
from weft.schemas.video import CLIP_FIELDS, encode_frames
from weft.stages.base import ItemError, Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.video.clip_rules import ClipRules, PlannedClip, plan_clips

ENCODE_TIMEOUT_S = 600.0  # after the last frame is piped in


class ClipsConfig(StageConfig):
    """How shots become clips and what each clip carries downstream."""

    rules: ClipRules = Field(default_factory=ClipRules)
    output: Literal["mp4", "frames"] = Field(
        "mp4", description="mp4: write clips/<clip_id>.mp4; frames: analysis frames only")
    analysis_fps: float = Field(4.0, gt=0, description="analysis frames per second of clip")
    max_analysis_frames: int = Field(32, ge=1, description="spread evenly when more would fit")
    analysis_max_side: int = Field(768, ge=16, description="analysis frames' long side, pixels")
    decode_chunk_frames: int = Field(32, ge=1, description="frames decoded per get_batch call")
    crf: int = Field(23, ge=0, le=51)
    preset: str = "veryfast"
    max_side: int | None = Field(None, ge=16, description="downscale mp4 clips to this long side")
    encode_threads: int = Field(
        1, ge=1, description="x264 threads; fixed so the bytes do not depend on the machine")
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=1))


def analysis_indices(start: int, end: int, fps: float, analysis_fps: float,
                     cap: int) -> list[int]:
    """Frame indices sampled at `analysis_fps` over [start, end), at most `cap`, evenly spread."""
    n = end - start
    if n <= 0:
        return []
    count = min(cap, n, max(1, round(n * analysis_fps / fps)))
    return [start + int((i + 0.5) * n / count) for i in range(count)]


def _scaled(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    return max(1, round(width * scale)), max(1, round(height * scale))


class _Mp4Writer:
    """One clip's ffmpeg encoder fed raw RGB frames on stdin; renamed into place on close."""

    def __init__(self, ffmpeg: str, final: Path, width: int, height: int, fps: float,
                 config: ClipsConfig) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.mp4")
        final.parent.mkdir(parents=True, exist_ok=True)
        out_w, out_h = _scaled(width, height, config.max_side)
        out_w, out_h = max(2, out_w // 2 * 2), max(2, out_h // 2 * 2)  # yuv420p needs even sizes
        vf: list[str] = []
        if (out_w, out_h) != (width, height):
            vf = (["-vf", f"scale={out_w}:{out_h}:flags=area"] if config.max_side
                  else ["-vf", f"crop={out_w}:{out_h}:0:0"])
        rate = Fraction(fps).limit_denominator(100_000)
        cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", f"{rate.numerator}/{rate.denominator}", "-i", "-", "-an", *vf,
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(config.crf),
               "-preset", config.preset, "-threads", str(config.encode_threads),
               "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
               "-f", "mp4", str(self.tmp)]
        # Lives as long as the encoder (closed in close/abort); a pipe could fill and block it.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)
        self.frames = 0

    def _error(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-800:]

    def write(self, frames: np.ndarray) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError as exc:
            self.proc.wait()
            raise RuntimeError(f"ffmpeg stopped reading: {self._error()}") from exc
        self.frames += len(frames)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=ENCODE_TIMEOUT_S)
        if rc != 0:
            message = self._error()
            self.abort()
            raise RuntimeError(f"ffmpeg exited {rc}: {message}")
        self._stderr.close()
        self.tmp.replace(self.final)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class _ClipJob:
    """One kept clip being extracted: where it is, what it collected so far."""

    plan: PlannedClip
    clip_id: str
    picks: list[int]
    frames: list[np.ndarray] = field(default_factory=list)
    writer: _Mp4Writer | None = None
    size: tuple[int, int] = (0, 0)  # decoded (width, height)

    @property
    def start(self) -> int:
        return self.plan.start_frame

    @property
    def end(self) -> int:
        return self.plan.end_frame


class ClipsStage(Stage):
    """Expand a source into clip rows: one per candidate, kept ones with frames and an mp4."""

    name: ClassVar[str] = "clips"
    version: ClassVar[str] = "1"
    kind = "expand"
    item_kind: ClassVar[str] = "clip"
    Config: ClassVar[type[StageConfig]] = ClipsConfig
    input_columns: ClassVar[tuple[str, ...]] = (
        "path", "fps", "num_frames", "width", "height", "shots", "shot_detector")
    output_fields = CLIP_FIELDS
    heavy_columns: ClassVar[tuple[str, ...]] = ("frames",)
    uses_model: ClassVar[bool] = False
    config: ClipsConfig

    def __init__(self, config: StageConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        # VideoReaders this stage opened: one per source with kept clips, never one per clip.
        self.readers_opened = 0
        self._ffmpeg: str | None = None

    def setup(self) -> None:
        """decord, and ffmpeg with libx264 for mp4 output, must exist: fail once, clearly."""
        try:
            import decord  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"decord is required by the clips stage: {exc}") from exc
        if self.config.output != "mp4":
            return
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("ffmpeg is not on PATH; install it (apt-get install ffmpeg)")
        encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True,
                                  text=True, timeout=60, check=False).stdout
        if " libx264 " not in encoders:
            raise RuntimeError(f"{exe} has no libx264 encoder; clips.output=mp4 needs it")
        self._ffmpeg = exe

    def splitter_version(self, row: dict[str, Any]) -> str:
        """What made the cut points; part of every clip id."""
        return f"{row.get('shot_detector')}|clips{self.version}|{self.config.rules.rules_hash}"

    def _open_reader(self, path: str) -> Any:
        import decord

        self.readers_opened += 1
        return decord.VideoReader(path, ctx=decord.cpu(0),
                                  num_threads=max(1, int(self.resources.cpus)))

    # ---- the core -------------------------------------------------------------
    def process(self, row: dict[str, Any]) -> list[Outcome]:
        try:
            fps, num_frames = float(row["fps"]), int(row["num_frames"])
        except (TypeError, ValueError, KeyError) as exc:
            raise ItemError("bad_source_row", f"source row lacks fps/num_frames: {exc}") from exc
        if fps <= 0 or num_frames <= 0:
            raise ItemError("bad_source_row", f"fps {fps} and num_frames {num_frames} must be > 0")
        shots = [(int(s["start_frame"]), int(s["end_frame"])) for s in row.get("shots") or []]
        if not shots:
            raise ItemError("no_shots", "the source has no shots to cut clips from")
        source = row["item_id"]
        splitter = self.splitter_version(row)
        outcomes: list[Outcome] = []
        jobs: list[tuple[int, _ClipJob]] = []
        for planned in plan_clips(shots, fps, num_frames, self.config.rules):
            cid = clip_id(source, planned.start_s, planned.end_s, splitter)
            empty = planned.end_frame <= planned.start_frame
            entry = self.entry(row, self._scores(planned), item_id=cid, parent_id=source,
                               details=self._details(planned),
                               override=("drop", "empty_clip") if empty else None)
            outcomes.append(Outcome(entry, self._child_row(row, planned, cid)))
            if entry.decision == "keep":
                picks = analysis_indices(planned.start_frame, planned.end_frame, fps,
                                         self.config.analysis_fps,
                                         self.config.max_analysis_frames)
                jobs.append((len(outcomes) - 1, _ClipJob(planned, cid, picks)))
        position = {job.clip_id: i for i, job in jobs}
        for cid, result in self._extract(row["path"], fps, [j for _, j in jobs]).items():
            outcome = outcomes[position[cid]]
            if isinstance(result, tuple):
                reason, exc = result
                outcome.entry.decision, outcome.entry.reason = "error", reason
                outcome.entry.error_type = type(exc).__name__
                outcome.entry.error_message = str(exc)[:2000]
            else:
                outcome.row.update(result)
                outcome.entry.details["analysis_frames"] = len(result["frame_times"])
        return outcomes

    @staticmethod
    def _scores(planned: PlannedClip) -> dict[str, Any]:
        return {"duration_s": round(planned.duration_s, 6)}

    @staticmethod
    def _details(planned: PlannedClip) -> dict[str, Any]:
        return {"shot_index": planned.shot_index, "start_frame": planned.start_frame,
                "end_frame": planned.end_frame, "start_s": round(planned.start_s, 6),
                "end_s": round(planned.end_s, 6)}

    def _child_row(self, row: dict[str, Any], planned: PlannedClip, cid: str) -> dict[str, Any]:
        """A clip row with the span filled in; pixels and files come from extraction."""
        return {
            "item_id": cid, "parent_id": row["item_id"], "source_id": row.get("source_id"),
            "item_kind": self.item_kind, "path": row["path"],
            "start_s": planned.start_s, "end_s": planned.end_s,
            "start_frame": planned.start_frame, "end_frame": planned.end_frame,
            "fps": planned.fps, "width": row.get("width"), "height": row.get("height"),
            "clip_path": None, "frames": None, "frame_times": None, "frame_scale": None,
            "content_hash": None,
        }

    # ---- extraction: one reader, one forward pass ------------------------------
    def _extract(self, path: str, fps: float, jobs: list[_ClipJob]
                 ) -> dict[str, dict[str, Any] | tuple[str, Exception]]:
        """Per clip id: the extracted fields, or (reason, exception) for clips that failed."""
        results: dict[str, dict[str, Any] | tuple[str, Exception]] = {}
        if not jobs:
            return results
        pending = sorted(jobs, key=lambda j: (j.start, j.end))
        active: list[_ClipJob] = []
        try:
            reader = self._open_reader(path)
            available = len(reader)
            for job in [j for j in pending if j.end > available]:
                pending.remove(job)
                results[job.clip_id] = ("decode_failed", ItemError(
                    "decode_failed", f"clip ends at frame {job.end}, the decoder has "
                    f"{available} frames"))
            last = max((j.end for j in pending), default=0)
            chunk = self.config.decode_chunk_frames
            for pos in range(0, last, chunk):
                stop = min(pos + chunk, last)
                frames = reader.get_batch(list(range(pos, stop))).asnumpy()
                while pending and pending[0].start < stop:
                    active.append(pending.pop(0))
                for job in list(active):
                    try:
                        if job.size == (0, 0):
                            self._start(job, frames.shape[2], frames.shape[1], fps)
                        self._feed(job, frames, pos)
                        if job.end <= stop:
                            active.remove(job)
                            results[job.clip_id] = self._finish(job)
                    except Exception as exc:  # an encoder failure costs one clip
                        active.remove(job)
                        if job.writer is not None:
                            job.writer.abort()
                        results[job.clip_id] = ("encode_failed", exc)
        except Exception as exc:  # decoding stopped: every unfinished clip fails, none is lost
            for job in active + pending:
                if job.writer is not None:
                    job.writer.abort()
                results[job.clip_id] = ("decode_failed", exc)
        return results

    def _start(self, job: _ClipJob, width: int, height: int, fps: float) -> None:
        job.size = (width, height)
        if self.config.output == "mp4":
            assert self._ffmpeg is not None, "setup() was not called"
            final = Path(self.ctx.run_dir) / "clips" / f"{job.clip_id}.mp4"
            job.writer = _Mp4Writer(self._ffmpeg, final, width, height, fps, self.config)

    def _feed(self, job: _ClipJob, frames: np.ndarray, pos: int) -> None:
        """Hand the part of a chunk inside the clip to its encoder and analysis picks."""
        lo, hi = max(job.start, pos), min(job.end, pos + len(frames))
        if lo >= hi:
            return
        if job.writer is not None:
            job.writer.write(frames[lo - pos:hi - pos])
        size = _scaled(*job.size, self.config.analysis_max_side)
        for index in job.picks:
            if lo <= index < hi:
                frame = frames[index - pos]
                # A copy either way, so a kept pick never pins the whole chunk in memory.
                job.frames.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
                                  if size != job.size else frame.copy())

    def _finish(self, job: _ClipJob) -> dict[str, Any]:
        clip_path = None
        if job.writer is not None:
            job.writer.close()
            clip_path = str(job.writer.final.relative_to(Path(self.ctx.run_dir)))
        stack = np.stack(job.frames)
        encoded = encode_frames(stack)
        width, height = job.size
        return {"width": width, "height": height, "clip_path": clip_path, "frames": encoded,
                "frame_times": [i / job.plan.fps for i in job.picks],
                "frame_scale": stack.shape[2] / width,
                "content_hash": hashlib.sha256(encoded).hexdigest()}
