"""Probe: is this file a video we can read to the end, and what is it?

ffprobe reads the container's claims (codec, size, rate, length); a cheap
look at the container's own structure and a decord decode at the start,
middle and end check those claims, because a truncated file usually still
probes fine and only fails (or comes up short) where the bytes stop. Every
bad input becomes an error row with a reason code, never an exception.

Reason codes: empty_file, missing_file, size_changed, unsupported_extension,
probe_timeout, not_a_video, unreadable, extension_mismatch, no_frame_rate,
truncated, undecodable.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from weft.schemas.video import PROBE_FIELDS
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig

# File extension -> container family it must hold.
EXTENSION_FAMILY: dict[str, str] = {
    ".mp4": "mp4", ".m4v": "mp4", ".mov": "mp4",
    ".avi": "avi",
    ".mpg": "mpeg", ".mpeg": "mpeg",
    ".mkv": "matroska", ".webm": "matroska",
    ".ts": "mpegts",
}
# ffprobe format names (its `format_name` is a comma list) -> family.
FORMAT_FAMILY: dict[str, str] = {
    **dict.fromkeys(("mov", "mp4", "m4a", "3gp", "3g2", "mj2"), "mp4"),
    "avi": "avi",
    "mpeg": "mpeg", "mpegvideo": "mpeg",
    "matroska": "matroska", "webm": "matroska",
    "mpegts": "mpegts",
}
# ffprobe "finds a video stream" in text and still images too; those are not videos.
NOT_VIDEO_FORMATS = frozenset({"tty", "image2"})
NOT_VIDEO_CODECS = frozenset({"ansi"})
_MP4_TOP_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})


class ProbeConfig(StageConfig):
    """How strict the probe is. Every bad input is an error row, whatever these say."""

    require_extension_match: bool = Field(
        True, description="a file's extension must name the container it holds")
    decode_check_frames: int = Field(
        3, ge=2, description="frames decoded evenly from first to last (start, middle, end)")
    min_decoded_fraction: float = Field(
        0.9, gt=0, le=1, description="decodable frames / frames the container claims, or truncated")
    ffprobe_timeout_s: float = Field(30.0, gt=0)
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=1))


def _ratio(text: str | None) -> float | None:
    """'30000/1001' -> 29.97; None for missing, zero or malformed rates."""
    if not text:
        return None
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value if 0 < value <= 1000 else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None


def _int(value: Any) -> int | None:
    try:
        out = int(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None


def family_of(format_name: str) -> str | None:
    """The container family of an ffprobe format_name such as 'mov,mp4,m4a,3gp,3g2,mj2'."""
    for name in format_name.split(","):
        if name in FORMAT_FAMILY:
            return FORMAT_FAMILY[name]
    return None


def sniff_family(head: bytes) -> str | None:
    """The container family the first bytes announce, or None (not a known video)."""
    if len(head) >= 8 and head[4:8] in _MP4_TOP_BOXES:
        return "mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    return None


def structural_truncation(path: Path, family: str | None) -> str | None:
    """Why the container's own size fields say the file was cut short, or None.

    MP4 top-level boxes and the AVI RIFF header declare their sizes, so a cut
    is visible without decoding. Other families have no such sizes (None).
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if family == "avi":
            head = fh.read(12)
            declared = struct.unpack("<I", head[4:8])[0] + 8 if len(head) >= 8 else 0
            if declared > size:
                return f"RIFF header declares {declared} bytes, file has {size}"
            return None
        if family != "mp4":
            return None
        offset, seen_moov = 0, False
        for _ in range(1_000_000):
            if offset >= size:
                break
            fh.seek(offset)
            header = fh.read(16)
            if len(header) < 8:
                return f"file ends inside a box header at byte {offset}"
            box_size, box_type = struct.unpack(">I", header[:4])[0], header[4:8]
            seen_moov = seen_moov or box_type == b"moov"
            if box_size == 1:
                if len(header) < 16:
                    return f"file ends inside a box header at byte {offset}"
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:  # extends to the end of the file
                break
            if box_size < 8:
                return None  # malformed, not a cut: leave the verdict to the decoders
            if offset + box_size > size:
                return (f"{box_type.decode('latin-1')!r} box at byte {offset} declares "
                        f"{box_size} bytes, only {size - offset} remain")
            offset += box_size
        if not seen_moov:
            return "no 'moov' box: the file was never finalised"
    return None


class ProbeStage(Stage):
    """Score a source video's length, size and rate; error out anything unreadable."""

    name: ClassVar[str] = "probe"
    version: ClassVar[str] = "1"
    kind = "map"
    item_kind: ClassVar[str] = "source"
    Config: ClassVar[type[StageConfig]] = ProbeConfig
    input_columns: ClassVar[tuple[str, ...]] = ("path", "size_bytes")
    output_fields = PROBE_FIELDS
    uses_model: ClassVar[bool] = False
    config: ProbeConfig

    def setup(self) -> None:
        """ffprobe and decord are required: missing ones fail here, once, clearly."""
        exe = shutil.which("ffprobe")
        if exe is None:
            raise RuntimeError("ffprobe is not on PATH; install ffmpeg (apt-get install ffmpeg)")
        self._ffprobe = exe
        try:
            import decord  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"decord is required by the probe stage: {exc}") from exc

    # ---- steps --------------------------------------------------------------
    def _ffprobe_json(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        """(parsed ffprobe output or None, stderr)."""
        cmd = [self._ffprobe, "-v", "error", "-print_format", "json",
               "-show_format", "-show_streams", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=self.config.ffprobe_timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ItemError("probe_timeout", f"ffprobe took over "
                            f"{self.config.ffprobe_timeout_s}s on {path}") from exc
        stderr = proc.stderr.strip()[-500:]
        try:
            data = json.loads(proc.stdout or "{}")
        except json.JSONDecodeError:
            data = {}
        if proc.returncode != 0 or not data.get("format"):
            return None, stderr
        return data, stderr

    def _probe_failed(self, path: Path, stderr: str) -> ItemError:
        """ffprobe could not open the file: a cut video, a broken one, or not a video."""
        with open(path, "rb") as fh:
            family = sniff_family(fh.read(512))
        if family is None:
            return ItemError("not_a_video", f"no known video container in {path.name}: {stderr}")
        cut = structural_truncation(path, family)
        if cut is not None:
            return ItemError("truncated", f"{path.name} ({family}): {cut}")
        return ItemError("unreadable", f"{path.name} looks like {family} but ffprobe "
                         f"cannot read it: {stderr}")

    def _decode_check(self, path: Path, reported_frames: int | None) -> dict[str, Any]:
        """Decode frames from first to last; a cut file fails or comes up short."""
        import decord

        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            count = len(reader)
        except Exception as exc:  # decord raises its own error types
            raise ItemError("undecodable", f"decoder cannot open {path.name}: "
                            f"{str(exc).strip()[-300:]}") from exc
        if count <= 0:
            raise ItemError("undecodable", f"decoder finds no frames in {path.name}")
        k = self.config.decode_check_frames
        indices = sorted({round(i * (count - 1) / (k - 1)) for i in range(k)})
        shape: tuple[int, ...] = ()
        for index in indices:
            try:
                shape = tuple(reader.get_batch([index]).shape)
            except Exception as exc:
                reason = "undecodable" if index == 0 else "truncated"
                raise ItemError(reason, f"decoding frame {index} of {count} in {path.name} "
                                f"failed: {str(exc).strip()[-300:]}") from exc
        del reader
        if reported_frames and count < self.config.min_decoded_fraction * reported_frames:
            raise ItemError("truncated", f"{path.name}: the stream ends after {count} frames, "
                            f"the container claims {reported_frames}")
        return {"decoded_frames": count, "checked_frames": indices,
                "decoded_shape": list(shape[1:])}

    # ---- the core -------------------------------------------------------------
    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path = Path(row["path"])
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ItemError("missing_file", f"cannot stat {path}: {exc}") from exc
        if size == 0:
            raise ItemError("empty_file", f"{path.name} has 0 bytes")
        if row.get("size_bytes") is not None and int(row["size_bytes"]) != size:
            raise ItemError("size_changed", f"{path.name} was {row['size_bytes']} bytes at "
                            f"discovery, is {size} now; its id no longer matches its bytes")
        ext = path.suffix.lower()
        if self.config.require_extension_match and ext not in EXTENSION_FAMILY:
            raise ItemError("unsupported_extension", f"{path.name}: {ext or 'no extension'} is "
                            f"not a video extension ({', '.join(sorted(EXTENSION_FAMILY))})")

        data, stderr = self._ffprobe_json(path)
        if data is None:
            raise self._probe_failed(path, stderr)
        fmt = data["format"]
        format_name = str(fmt.get("format_name", ""))
        videos = [s for s in data.get("streams", [])
                  if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")]
        if (not videos or set(format_name.split(",")) & NOT_VIDEO_FORMATS
                or format_name.endswith("_pipe")
                or videos[0].get("codec_name") in NOT_VIDEO_CODECS):
            raise ItemError("not_a_video", f"{path.name}: no video stream "
                            f"(format {format_name or '?'})")
        family = family_of(format_name)
        if self.config.require_extension_match and family != EXTENSION_FAMILY[ext]:
            raise ItemError("extension_mismatch", f"{path.name}: extension {ext} means "
                            f"{EXTENSION_FAMILY[ext]}, the file holds {format_name}")
        cut = structural_truncation(path, family)
        if cut is not None:
            raise ItemError("truncated", f"{path.name} ({family}): {cut}")

        stream = videos[0]
        fps = _ratio(stream.get("avg_frame_rate")) or _ratio(stream.get("r_frame_rate"))
        if fps is None:
            raise ItemError("no_frame_rate", f"{path.name}: stream has no usable frame rate")
        duration = _float(stream.get("duration")) or _float(fmt.get("duration"))
        reported = _int(stream.get("nb_frames")) or (
            round(duration * fps) if duration is not None else None)
        checked = self._decode_check(path, reported)
        num_frames = checked["decoded_frames"]
        if duration is None:
            duration = num_frames / fps

        width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
        out = {"container": family or format_name, "codec": stream.get("codec_name"),
               "duration_s": round(duration, 6), "fps": fps, "width": width,
               "height": height, "num_frames": num_frames}
        scores = {"duration_s": out["duration_s"], "width": width, "height": height,
                  "fps": round(fps, 6), "num_frames": num_frames}
        details = {"format_name": format_name, "codec": stream.get("codec_name"),
                   "pix_fmt": stream.get("pix_fmt"),
                   "bit_rate": _int(fmt.get("bit_rate")) or _int(stream.get("bit_rate")),
                   "reported_frames": reported, "extension": ext, "size_bytes": size,
                   **checked}
        return [Outcome(self.entry(row, scores, details=details), out)]
