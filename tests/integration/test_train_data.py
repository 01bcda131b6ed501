"""The training loader over real shards and real DataLoader workers: exactly once per
epoch across ranks and workers, exact resume, and resume after a change of workers or
ranks without a repeated sample."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weft.model.mot import UnifiedConfig
from weft.pipelines.shard import write_shards
from weft.schemas.ids import hash_of
from weft.train.config import DataConfig
from weft.train.data import (
    DataPack,
    DataStateError,
    DataStateTracker,
    PackedStream,
    build_dataloader,
)
from weft.train.shard_loader import TooFewShardsError

pytestmark = pytest.mark.integration

UNIFIED = UnifiedConfig()


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _frame_jpeg(seed: int) -> bytes:
    """A video-like frame (smooth gradient plus a moving square) when no demo run exists."""
    y, x = np.mgrid[0:96, 0:128]
    frame = np.stack([x * 2, y * 2, (x + y + seed * 9) % 256], axis=-1).astype(np.uint8)
    frame[20:50, 10 + seed % 60:40 + seed % 60] = 255
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _video_samples() -> list[dict]:
    """Synthetic clips: a moving square over a gradient, transition captions (hermetic:
    the same samples on every machine, whatever runs/ holds)."""
    out = []
    for i in range(10):
        key = hash_of("train-data-video", i)
        sequence, members = [], {}
        for n in range(4):
            if n:
                sequence.append({"type": "text", "role": "caption",
                                 "text": f"clip {i}, step {n}: the white square slides "
                                         "to the right across a smooth colour gradient while "
                                         "the camera stays still and the light is unchanged"})
            name = f"{key}.{n}.jpg"
            members[name] = _frame_jpeg(i * 3 + n)
            sequence.append({"type": "video_frame", "member": name, "time_s": n * 0.5})
        record = {"key": key, "kind": "video_clip", "sequence": sequence, "scores": {},
                  "parent_ids": []}
        out.append({"key": key, "json": record, "members": members})
    return out


def _text(role: str, text: str) -> dict:
    return {"type": "text", "role": role, "text": text}


def _task_samples(n: int) -> list[dict]:
    """web_doc, text_to_image, vqa and image_edit samples with small PNGs."""
    out = []
    for i in range(n):
        key = hash_of("train-data-task", i)
        img = [f"{key}.{k}.png" for k in range(2)]
        kind = ("web_doc", "text_to_image", "vqa", "image_edit")[i % 4]
        image = [{"type": "image", "member": m} for m in img]
        sequence = {
            "web_doc": [_text("title", f"page {i}"), _text("caption", "a red box"), image[0],
                        _text("text", f"body text number {i} about boxes")],
            "text_to_image": [_text("prompt", f"a box number {i}"), image[0]],
            "vqa": [image[0], _text("question", "what is it?"), _text("answer", f"box {i}")],
            "image_edit": [image[0], _text("instruction", "make it blue"), image[1]],
        }[kind]
        used = [it["member"] for it in sequence if "member" in it]
        record = {"key": key, "kind": kind, "sequence": sequence, "scores": {},
                  "parent_ids": []}
        out.append({"key": key, "json": record,
                    "members": {m: _png(i * 2 + k) for k, m in enumerate(used)}})
    return out


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """A mixture folder: video (one clip per shard) and tasks (two samples per shard)."""
    root = tmp_path_factory.mktemp("mixture")
    video = write_shards(_video_samples(), root / "video", max_shard_bytes=1, prefix="video")
    tasks = write_shards(_task_samples(16), root / "tasks", max_shard_bytes=9_000,
                         prefix="tasks")
    assert len(video.shards) >= 8 and len(tasks.shards) >= 6
    index = {"__kind__": "weft-mixture", "format_version": 1, "datasets": [
        {"name": "video", "probability": 0.4, "index": "video/index.json"},
        {"name": "tasks", "probability": 0.6, "index": "tasks/index.json"}]}
    (root / "mixture.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = Path.home() / ".cache/weft/models/tiny/qwen2_5"
    if not (path / "tokenizer_config.json").is_file():
        from weft.stages.infer.tiny_models import make_tiny_models

        path = make_tiny_models(tmp_path_factory.mktemp("tiny"))["qwen2_5"]
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _config(mixture: Path, workers: int = 2) -> DataConfig:
    return DataConfig.model_validate({
        "shards": str(mixture), "num_workers": workers, "seed": 3,
        "images": {"vit_max_patches": 16, "vae_max_side": 64, "vae_min_side": 32},
        "pack": {"expected_tokens": 384, "max_tokens": 512, "max_tokens_per_sample": 512,
                 "overflow_buffer": 2, "pad_multiple": 64},
        "cfg_dropout": {"text": 0.2, "vit": 0.3, "vae": 0.2}})


def _all_keys(mixture: Path) -> set[str]:
    return {k for name in ("video", "tasks")
            for k in pq.read_table(mixture / name / "manifest.parquet")["key"].to_pylist()}


def _loader(mixture, tokenizer, workers=2, rank=0, world=1, epochs=1):
    loader = build_dataloader(_config(mixture, workers), tokenizer, UNIFIED, rank, world,
                              vit_patch=16, epochs=epochs)
    return loader, DataStateTracker(loader)


def _take(tracker: DataStateTracker, loader, n: int | None = None) -> list[DataPack]:
    packs = []
    for pack in tracker.track(loader):
        packs.append(pack)
        if n is not None and len(packs) == n:
            break
    return packs


def _signature(packs: list[DataPack]) -> list[tuple]:
    return [(tuple(p.keys), p.batch.num_tokens, int(p.batch.input_ids.sum()),
             round(float(sum(im.sum() for im in p.batch.vae_images)), 2)) for p in packs]


def test_two_ranks_two_workers_pack_every_sample_exactly_once(mixture, tokenizer):
    packs = []
    for rank in (0, 1):
        loader, tracker = _loader(mixture, tokenizer, rank=rank, world=2)
        packs += _take(tracker, loader)
    counts = Counter(k for p in packs for k in p.keys)
    assert set(counts) == _all_keys(mixture) and set(counts.values()) == {1}
    assert {p.reader for p in packs} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {d for p in packs for d in p.datasets} == {"video", "tasks"}
    for p in packs:
        batch = p.batch.validate()
        assert batch.num_tokens <= 512 and batch.length % 64 == 0
        assert p.stats["token_counts"] == batch.token_counts()
        assert p.stats["skipped"] == {}
    kinds = Counter()
    for p in packs:
        kinds.update(p.stats["token_counts"])
    assert all(kinds[k] > 0 for k in ("text", "vit", "vae_clean", "vae_noised"))


def _take_until(tracker: DataStateTracker, loader, stop) -> list[DataPack]:
    """Packs until `stop(packs, state)` holds for the tracker's state; fails if never."""
    packs = []
    for pack in tracker.track(loader):
        packs.append(pack)
        if stop(packs, tracker.state_dict()):
            return packs
    pytest.fail("the stream ended before the state to test came up")


def test_resume_continues_with_exactly_the_packs_of_an_uninterrupted_run(mixture, tokenizer):
    loader, tracker = _loader(mixture, tokenizer)
    full = _signature(_take(tracker, loader))
    assert len(full) >= 6

    # Stop where a reader holds buffered plans and the next pack is worker 1's, resume,
    # stop again three packs later, resume again: the packs are the uninterrupted ones.
    loader, tracker = _loader(mixture, tokenizer)
    first = _take_until(tracker, loader, lambda packs, state: len(packs) % 2 == 1 and any(
        r["overflow"] for r in state["readers"]))
    state = json.loads(json.dumps(tracker.state_dict()))  # plain, JSON-serialisable
    assert state["next_worker"] == 1
    loader, tracker = _loader(mixture, tokenizer)
    tracker.load_state_dict(state)
    second = _take(tracker, loader, 3)
    loader2, tracker2 = _loader(mixture, tokenizer)
    tracker2.load_state_dict(tracker.state_dict())
    rest = _take(tracker2, loader2)
    assert _signature(first) + _signature(second) + _signature(rest) == full


def test_fewer_workers_after_resume_repeat_no_sample_across_two_epochs(mixture, tokenizer):
    loader, tracker = _loader(mixture, tokenizer, epochs=2)
    # Stop while the two readers are in different epochs of a dataset.
    first = _take_until(tracker, loader, lambda packs, state: any(
        len({r["datasets"][name]["epoch"] for r in state["readers"]}) > 1
        for name in ("video", "tasks")))
    state = tracker.state_dict()
    loader, tracker = _loader(mixture, tokenizer, workers=1, epochs=2)
    tracker.load_state_dict(state)
    rest = _take(tracker, loader)
    counts = Counter(k for p in first + rest for k in p.keys)
    assert set(counts) == _all_keys(mixture) and set(counts.values()) == {2}, counts
    assert {p.reader for p in rest} == {(0, 0)}


def test_fewer_ranks_after_resume_need_every_ranks_state(mixture, tokenizer):
    states, first = [], []
    for rank in (0, 1):
        loader, tracker = _loader(mixture, tokenizer, rank=rank, world=2)
        first += _take(tracker, loader, 2)
        states.append(tracker.state_dict())
    loader, tracker = _loader(mixture, tokenizer, rank=0, world=1)
    with pytest.raises(DataStateError, match=r"2 rank\(s\) x 2 worker\(s\); this run has 1 x "
                                             r"2.*every rank's state.*all_gather_object"):
        tracker.load_state_dict(states[0])
    tracker.load_state_dict(states)
    counts = Counter(k for p in first + _take(tracker, loader) for k in p.keys)
    assert set(counts) == _all_keys(mixture) and set(counts.values()) == {1}


def test_changed_data_settings_and_too_few_shards_are_refused(mixture, tokenizer):
    state = _loader(mixture, tokenizer)[1].state_dict()
    other = _config(mixture).model_copy(update={"seed": 4})
    changed = DataStateTracker(PackedStream(other, tokenizer, UNIFIED, rank=0, world_size=1,
                                            vit_patch=16))
    with pytest.raises(DataStateError, match=r"seed differs.*start the data stream afresh"):
        changed.load_state_dict(state)
    with pytest.raises(TooFewShardsError, match=r"dataset \w+: \d+ shard\(s\) for 8 rank"):
        PackedStream(_config(mixture), tokenizer, UNIFIED, rank=0, world_size=8, vit_patch=16)


def test_resampled_stream_resumes_exactly_and_has_no_epochs(mixture, tokenizer):
    config = _config(mixture).model_copy(update={"resampled": True})
    path = tokenizer.name_or_path  # a tokenizer directory works as well as a tokenizer
    loader = build_dataloader(config, path, UNIFIED, 0, 1, vit_patch=16)
    full = _signature(_take(DataStateTracker(loader), loader, 6))
    loader = build_dataloader(config, path, UNIFIED, 0, 1, vit_patch=16)
    tracker = DataStateTracker(loader)
    first = _signature(_take(tracker, loader, 3))
    loader = build_dataloader(config, path, UNIFIED, 0, 1, vit_patch=16)
    resumed = DataStateTracker(loader)
    resumed.load_state_dict(tracker.state_dict())
    assert first + _signature(_take(resumed, loader, 3)) == full
    with pytest.raises(ValueError, match=r"only without data\.resampled"):
        build_dataloader(config, tokenizer, UNIFIED, 0, 1, vit_patch=16, epochs=1)
