"""Session-wide curation runs over real media that several test modules read.

`video_run` and `web_run` each run their Prefect flow once per test session (Ray
and Prefect for real); the flow tests check them, and the shard, audit and
policy tests build on their run directories instead of paying for new runs.
"""

from __future__ import annotations

import http.server
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from weft.pipelines import video

sys.path.insert(0, str(Path(__file__).parent))
from web_inputs import GIMP_PAGES, copy_pages, fortunes, hostile_inputs, wiki_texts


def _make_inputs(root: Path, asset, ffmpeg) -> dict[str, Path]:
    """Real videos, an exact copy, and every kind of bad input the issue names."""
    root.mkdir(parents=True, exist_ok=True)
    bikes = asset("bikes.mp4")
    files = {
        "bikes": root / "bikes.mp4",
        "bikes_copy": root / "copies" / "bikes_again.mp4",
        "megamind": root / "Megamind.avi",
        "megamind_bugy": root / "Megamind_bugy.avi",
        "zero": root / "empty.mp4",
        "truncated": root / "truncated.mp4",
        "random": root / "random.mp4",
        "wrong_ext": root / "bikes_really.avi",
    }
    files["bikes_copy"].parent.mkdir(exist_ok=True)
    data = bikes.read_bytes()
    files["bikes"].write_bytes(data)
    files["bikes_copy"].write_bytes(data)
    files["megamind"].write_bytes(asset("Megamind.avi").read_bytes())
    files["megamind_bugy"].write_bytes(asset("Megamind_bugy.avi").read_bytes())
    files["zero"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) * 2 // 5])
    files["random"].write_bytes(os.urandom(300_000))
    # A real video in a different container, with the wrong extension.
    ffmpeg("-i", str(bikes), "-t", "3", "-c:v", "libx264", "-an", "-f", "mp4",
           str(root / "tmp.mp4"))
    (root / "tmp.mp4").rename(files["wrong_ext"])
    return files


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from weft.stages.video.open_clip_model import save_tiny_open_clip

    out = tmp_path_factory.mktemp("tiny-clip")
    save_tiny_open_clip(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from weft.stages.infer.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def video_run(tmp_path_factory, asset, ffmpeg, tiny_clip_dir, tiny_models) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("video-flow")
    inputs = _make_inputs(root / "inputs", asset, ffmpeg)
    (root / "models.yaml").write_text(yaml.safe_dump({"models": {
        "caption-vlm": {"path": str(tiny_models["qwen2_5_vl"]), "kind": "vlm",
                        "batch_size": 4}}}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        # The tiny random models' semantic and caption-quality scores mean nothing;
        # this policy keeps them in the ledger without deciding on them.
        "policy": str(video.CONFIGS_DIR / "policies" / "video-tiny-models.yaml"),
        "models": str(root / "models.yaml"),
        # One request cache for every run of this module: no run pays twice.
        "inference": {"cache_path": str(root / "requests.sqlite")},
        "partition_size": 2,
        "embed": {"model_dir": str(tiny_clip_dir)},
        "ray": {"progress_bars": False},
    }))
    from weft.flows import video_flow

    run_dir = root / "run"
    started = time.perf_counter()
    result = video_flow(input_dir=str(root / "inputs"), run_dir=str(run_dir),
                        config_path=str(config))
    return {"root": root, "inputs": inputs, "config": config, "run_dir": run_dir,
            "result": result, "seconds": time.perf_counter() - started}



def _long_prose(texts: list[str], n: int) -> list[str]:
    """n passages of 3 joined lead paragraphs each (enough words for the Gopher rules)."""
    return [" ".join(texts[3 * i:3 * i + 3]) for i in range(n)]


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Answers only after the client has given up: a URL that hangs."""

    def do_GET(self) -> None:
        time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def hanging_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def web_run(tmp_path_factory, asset, hanging_url) -> dict[str, Any]:
    from weft.flows import web_flow
    from weft.stages.infer.tiny_models import make_tiny_models
    from weft.stages.web.fasttext_classifier import train_classifier

    root = tmp_path_factory.mktemp("web-flow")
    inputs = root / "inputs"
    inputs.mkdir()
    pages = copy_pages(asset("gimp-help-en"), inputs, GIMP_PAGES)
    # a lightly edited mirror of a page: a near-duplicate document
    mirror = inputs / "gimp-tool-shear-mirror.html"
    text = (inputs / "gimp-tool-shear.html").read_text()
    mirror.write_text(text.replace("Shear", "Shear (mirror copy)", 1))
    wiki = wiki_texts(asset("summaries_en-us.json"))
    files = hostile_inputs(inputs, _long_prose(wiki[100:], 10))
    # encyclopedic prose with one good picture: the classifier is sure, no LLM call
    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (5, 5), 1.0)
    cv2.imwrite(str(inputs / "images" / "prose.png"), picture)
    prose = _long_prose(wiki[200:], 4)
    (inputs / "hang.html").write_text(f"<html><body><p>{prose[2]}</p>"
                                      f"<img src='{hanging_url}' alt='slow'>"
                                      f"<p>{prose[3]}</p></body></html>")
    (inputs / "prose.html").write_text(f"<html><body><p>{prose[0]}</p>"
                                       f"<img src='images/prose.png' alt='a picture'>"
                                       f"<p>{prose[1]}</p></body></html>")
    classifier = root / "classifier"
    train_classifier(wiki[:600] + fortunes(asset("fortunes-cookie"))[:600],
                     ["high"] * 600 + ["low"] * 600, classifier, seed=0,
                     data_source="wikipedia summaries (high) vs fortunes cookie (low)")
    tiny = make_tiny_models(root / "tiny")
    (root / "models.yaml").write_text(yaml.safe_dump({"models": {
        "filter-llm": {"path": str(tiny["qwen2_5"]), "kind": "llm", "batch_size": 4},
        "caption-vlm": {"path": str(tiny["qwen2_5_vl"]), "kind": "vlm", "batch_size": 4}}}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "models": str(root / "models.yaml"),
        "inference": {"cache_path": str(root / "requests.sqlite")},
        "quality_classifier": {"model_path": str(classifier / "model.bin")},
        "partition_size": 8,
        "image_load": {"fetch": {"timeout_s": 1.0, "deadline_s": 2.0, "retries": 1,
                                 "backoff_s": 0.1}},
        "ray": {"progress_bars": False},
    }))
    result = web_flow(input_dir=str(inputs), run_dir=str(root / "run"), config_path=str(config))
    return {"root": root, "run_dir": root / "run", "result": result, "files": files,
            "pages": pages, "mirror": mirror, "config": config}


