"""Video pipeline throughput against plain ffmpeg, measured in the same run.

Prints:
  - reference: ffmpeg decoding the same inputs to null (frames/s), and ffmpeg
    transcoding them to x264 with the clips stage's settings
  - clips stage: the one-pass decord decode + extraction (frames/s) and its ratio
  - whole pipeline (Prefect + Ray, every stage): source frames/s, ratio, clips/s

    python bench/video.py [--videos bikes.mp4 cityCC0.mpg ...] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def ffprobe_frames(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["streams"][0]["nb_read_frames"])


def ffmpeg_null_decode(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", str(p), "-map", "0:v:0",
                        "-f", "null", "-"], check=True)
    return time.perf_counter() - start


def ffmpeg_transcode(paths: list[Path], work: Path) -> float:
    """The same work as the clips stage's mp4 output: decode + x264 veryfast, 1 thread."""
    start = time.perf_counter()
    for p in paths:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-threads", "1", "-i", str(p),
                        "-map", "0:v:0", "-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0",
                        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
                        "-threads", "1", "-pix_fmt", "yuv420p", str(work / f"{p.stem}.mp4")],
                       check=True)
    return time.perf_counter() - start


def clips_stage_decode(paths: list[Path], run_dir: Path) -> tuple[float, int]:
    """Time the clips stage alone: whole videos as one shot each, frames output."""
    from weft.schemas.policy import Policy
    from weft.stages.base import RunContext
    from weft.stages.video.clips import ClipsStage
    from weft.stages.video.probe import ProbeStage

    ctx = RunContext("bench", str(run_dir), Policy(name="bench", version=1), "bench")
    probe = ProbeStage(None, ctx)
    rows = probe.process_rows([{"item_id": p.name, "source_id": p.name, "item_kind": "source",
                                "path": str(p), "size_bytes": p.stat().st_size} for p in paths])
    for r in rows:
        r["shots"] = [{"start_frame": 0, "end_frame": r["num_frames"]}]
        r["shot_detector"] = "bench"
    stage = ClipsStage(ClipsStage.Config(output="mp4"), ctx)
    stage.ensure_setup()
    start = time.perf_counter()
    out = stage(pa.Table.from_pylist(rows))
    return time.perf_counter() - start, out.num_rows


def whole_pipeline(paths: list[Path], work: Path) -> tuple[float, int]:
    from weft.flows import video_flow

    inputs = work / "inputs"
    inputs.mkdir()
    for p in paths:
        shutil.copyfile(p, inputs / p.name)
    cfg = work / "config.yaml"
    cfg.write_text("ray:\n  progress_bars: false\n")
    start = time.perf_counter()
    result = video_flow(input_dir=str(inputs), run_dir=str(work / "run"), config_path=str(cfg))
    elapsed = time.perf_counter() - start
    clips = next(r for r in result["funnel"] if r["stage"] == "clips")["kept"]
    return elapsed, clips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", nargs="+",
                        default=["bikes.mp4", "cityCC0.mpg", "Megamind.avi"])
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    from weft.assets import fetch

    paths = [fetch(v) for v in args.videos]
    frames = sum(ffprobe_frames(p) for p in paths)
    ref = ffmpeg_null_decode(paths)
    print(f"inputs: {len(paths)} videos, {frames} frames")
    print(f"reference  ffmpeg -f null (1 thread): {frames / ref:9.1f} frames/s")
    with tempfile.TemporaryDirectory() as tmp:
        transcode = ffmpeg_transcode(paths, Path(tmp))
        print(f"reference  ffmpeg decode+x264 (1 th.): {frames / transcode:9.1f} frames/s")
        t, n = clips_stage_decode(paths, Path(tmp))
        print(f"clips stage decode+mp4 encode       : {frames / t:9.1f} frames/s  "
              f"ratio {(frames / t) / (frames / ref):.3f} vs decode, "
              f"{(frames / t) / (frames / transcode):.3f} vs transcode  ({n} clips)")
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            t, clips = whole_pipeline(paths, Path(tmp))
            print(f"whole pipeline (all stages)         : {frames / t:9.1f} frames/s  "
                  f"ratio {(frames / t) / (frames / ref):.3f}  {clips / t:.2f} clips/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
