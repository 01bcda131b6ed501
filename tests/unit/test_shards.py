"""Shard writer and verifier: deterministic bytes, roll-over, readers, damage reports."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weft.pipelines.shard import verify_shards, write_shards
from weft.pipelines.shard_samples import convert_run, samples_from_captions, samples_from_docs
from weft.schemas.ids import hash_of
from weft.schemas.shards import (
    MANIFEST_SCHEMA,
    ShardFormatError,
    check_key,
    safe_member_name,
    validate_record,
)


def _image(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _sample(i: int, n_images: int = 2) -> dict:
    key = hash_of("test-sample", i)
    exts = ["jpg", "png", "webp"]
    fmts = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    members, sequence = {}, [{"type": "text", "role": "caption", "text": f"sample {i}"}]
    for n in range(n_images):
        ext = exts[(i + n) % 3]
        name = f"{key}.{n}.{ext}"
        members[name] = _image(i * 10 + n, fmts[ext])
        sequence.append({"type": "image", "member": name, "alt": f"alt {n}"} if i % 2 else
                        {"type": "video_frame", "member": name, "time_s": float(n)})
    record = {"key": key, "kind": "web_doc" if i % 2 else "video_clip",
              "source_id": hash_of("src", i), "parent_ids": [hash_of("src", i)],
              "ledger_item_id": hash_of("item", i), "sequence": sequence,
              "scores": {"quality": i / 10}, "licence": None}
    return {"key": key, "json": record, "members": members}


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [_sample(i) for i in range(12)]


def _shas(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.is_file()}


def test_bytes_are_deterministic_and_order_free(tmp_path, samples):
    a = write_shards(samples, tmp_path / "a", max_shard_bytes=20_000, seed=3)
    b = write_shards(list(reversed(samples)), tmp_path / "b", max_shard_bytes=20_000, seed=3)
    assert _shas(tmp_path / "a") == _shas(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    c = write_shards(samples, tmp_path / "c", max_shard_bytes=20_000, seed=4)
    order = [r["key"] for r in pq.read_table(tmp_path / "a" / "manifest.parquet").to_pylist()]
    order_c = [r["key"] for r in pq.read_table(tmp_path / "c" / "manifest.parquet").to_pylist()]
    assert sorted(order) == sorted(order_c) and order != order_c
    assert c.n_samples == a.n_samples == len(samples)


def test_rollover_and_every_sample_once(tmp_path, samples):
    out = tmp_path / "s"
    summary = write_shards(samples, out, max_shard_bytes=8_000, seed=0)
    assert len(summary.shards) > 2
    assert [s.name for s in summary.shards] == [f"shard-{i:06d}.tar"
                                                for i in range(len(summary.shards))]
    keys = []
    for shard in summary.shards:
        with tarfile.open(out / shard.name) as tar:
            names = tar.getnames()
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == \
                    (0, 0, 0, "", 0o644)
        shard_keys = list(dict.fromkeys(n.split(".")[0] for n in names))
        assert len(shard_keys) == shard.nsamples
        keys += shard_keys
        # a shard holds more than one sample only while it stays under the limit
        assert shard.nsamples == 1 or shard.nbytes <= 8_000 + 10_240
    assert sorted(keys) == sorted(s["key"] for s in samples)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.schema.metadata[b"weft.schema_version"] == b"1"
    assert manifest.schema.names == MANIFEST_SCHEMA.names
    rows = manifest.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys)
    row = rows[0]
    with open(out / row["shard"], "rb") as fh:  # offset/size address the sample's bytes
        fh.seek(row["offset"])
        blob = fh.read(row["size"])
    with tarfile.open(fileobj=io.BytesIO(blob + b"\0" * 1024)) as tar:
        assert tar.getnames() == row["members"]
    index = json.loads((out / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [e["nsamples"] for e in index["shardlist"]] == [s.nsamples for s in summary.shards]
    # rewriting with fewer shards removes the stale ones
    write_shards(samples[:1], out, seed=0)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def test_webdataset_reads_every_sample(tmp_path, samples):
    import webdataset as wds

    summary = write_shards(samples, tmp_path, max_shard_bytes=8_000)
    urls = [str(tmp_path / s.name) for s in summary.shards]
    by_key = {s["key"]: s for s in samples}
    seen = set()
    for item in wds.WebDataset(urls, shardshuffle=False):
        key = item["__key__"]
        record = json.loads(item["json"])
        assert record == by_key[key]["json"]
        for name, data in by_key[key]["members"].items():
            assert item[name.split(".", 1)[1]] == data
        seen.add(key)
    assert seen == set(by_key)


def test_wids_loads_the_index(tmp_path, samples):
    wids = pytest.importorskip("wids")
    write_shards(samples, tmp_path, max_shard_bytes=8_000)
    ds = wids.ShardListDataset(str(tmp_path / "index.json"), transformations=[])
    assert len(ds) == len(samples)
    by_key = {s["key"]: s for s in samples}
    for i in range(len(ds)):
        item = ds[i]
        expected = by_key.pop(item["__key__"])
        assert json.loads(item[".json"].read()) == expected["json"]
        for name, data in expected["members"].items():
            assert item["." + name.split(".", 1)[1]].read() == data
    assert not by_key


def test_verify_clean_flipped_and_truncated(tmp_path, samples):
    summary = write_shards(samples, tmp_path, max_shard_bytes=8_000)
    report = verify_shards(tmp_path)
    assert report.ok, report.problems
    assert report.n_samples == len(samples) and report.n_shards == len(summary.shards)
    assert report.n_images == sum(len(s["members"]) for s in samples)

    first = tmp_path / summary.shards[0].name
    data = bytearray(first.read_bytes())
    data[700] ^= 0x01  # inside the first sample's json data
    first.write_bytes(bytes(data))
    report = verify_shards(tmp_path)
    assert not report.ok
    assert any("sha256" in p and first.name in p for p in report.problems)

    second = tmp_path / summary.shards[1].name
    clean = second.read_bytes()
    for cut in (1500, 3000):  # in a header, in image data
        second.write_bytes(clean[:cut])
        report = verify_shards(tmp_path)
        assert any(second.name in p and "sha256" in p for p in report.problems)
        assert any(f"{cut} bytes, index says" in p for p in report.problems)
        assert any(second.name in p and ("truncated" in p or "unreadable" in p)
                   for p in report.problems), (cut, report.problems)

    (tmp_path / "index.json").write_text("{not json")
    assert not verify_shards(tmp_path).ok


def test_verify_reports_an_undecodable_image(tmp_path):
    sample = _sample(1, n_images=1)
    name = next(iter(sample["members"]))
    sample["members"][name] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    write_shards([sample], tmp_path)
    report = verify_shards(tmp_path)
    assert any("does not decode" in p for p in report.problems)


def test_unsafe_names_and_dotted_keys_refused(tmp_path):
    key = "ab" * 16
    assert safe_member_name(f"{key}.json") == f"{key}.json"
    assert safe_member_name(f"{key}.3.webp", key)
    for bad in ["/etc/passwd", f"../{key}.json", f"a/{key}.json", f"{key}..json",
                f"{key}.0.gif", "AB" * 16 + ".json", "my.key.json", f"{key}", "",
                f"{key}.0.jpg/x", f"{key}\\.json"]:
        with pytest.raises(ShardFormatError):
            safe_member_name(bad)
    with pytest.raises(ShardFormatError):
        safe_member_name(f"{'cd' * 16}.json", key)
    for bad_key in ["a.b" + "0" * 16, "0" * 8, "G" * 20, None]:
        with pytest.raises(ShardFormatError):
            check_key(bad_key)
    sample = _sample(0)
    dotted = {**sample, "key": sample["key"][:20] + ".x"}
    with pytest.raises(ShardFormatError):
        write_shards([dotted], tmp_path)
    sneaky = {**sample, "members": {"../evil.jpg": b"x"}}
    with pytest.raises(ShardFormatError):
        write_shards([sneaky], tmp_path)
    unreferenced = {**sample, "members": {**sample["members"],
                                          f"{sample['key']}.9.jpg": _image(1)}}
    with pytest.raises(ShardFormatError):
        write_shards([unreferenced], tmp_path)
    with pytest.raises(ShardFormatError):
        write_shards([sample, sample], tmp_path)
    with pytest.raises(ShardFormatError):
        validate_record({**sample["json"], "kind": "audio"})
    assert not list(tmp_path.glob("*.tar"))


def test_samples_from_captions(tmp_path):
    frames = tmp_path / "keyframes"
    frames.mkdir()
    paths = []
    for n in range(2):
        (frames / f"f{n}.jpg").write_bytes(_image(n))
        paths.append(f"keyframes/f{n}.jpg")
    clip = hash_of("clip", 1)
    sequence = [{"type": "video_frame", "path": paths[0], "time_s": 0.5},
                {"type": "text", "role": "caption", "text": "a dog runs", "from_s": 0.5,
                 "to_s": 2.0},
                {"type": "video_frame", "path": paths[1], "time_s": 2.0}]
    (tmp_path / "outputs").mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "item_id": clip, "parent_id": hash_of("shot", 1), "source_id": "f" * 64,
        "keyframe_paths": paths, "keyframe_times": [0.5, 2.0],
        "sample_id": hash_of("video_sample", clip), "captions": ["a dog runs"],
        "sequence": json.dumps(sequence), "caption_model": "m"}]),
        tmp_path / "outputs" / "captions.parquet")
    [sample] = samples_from_captions(tmp_path)
    assert sample["key"] == hash_of("video_sample", clip)
    rec = sample["json"]
    assert rec["kind"] == "video_clip" and rec["ledger_item_id"] == clip
    assert [i["type"] for i in rec["sequence"]] == ["video_frame", "text", "video_frame"]
    assert sample["members"][rec["sequence"][2]["member"]] == (frames / "f1.jpg").read_bytes()
    out = tmp_path / "shards"
    write_shards([sample], out)
    assert verify_shards(out).ok

    bad = [{**sequence[0], "path": "../outside.jpg"}]
    pq.write_table(pa.Table.from_pylist([{"item_id": clip, "sequence": json.dumps(bad)}]),
                   tmp_path / "outputs" / "captions.parquet")
    with pytest.raises(ShardFormatError):
        samples_from_captions(tmp_path)
    # the shard step records the bad row and goes on
    [converted] = convert_run(tmp_path, "clips", pipeline="video")
    assert converted.sample is None and converted.reason == "conversion_error"
    assert "leaves the run directory" in str(converted.error)


def test_samples_from_docs(tmp_path):
    doc = hashlib.sha256(b"page").hexdigest()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(gif, format="GIF")
    items = [{"type": "text", "text": "hello"},
             {"type": "image", "src": "a.png", "alt": "an a"},
             {"type": "image", "src": "missing.jpg"},
             {"type": "text", "text": "between"},
             {"type": "image", "src": "c.gif"},
             {"type": "image", "src": "d.webp", "alt": ""}]
    (tmp_path / "outputs").mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "item_id": doc, "source_id": doc, "url": "https://example.org/", "title": "T",
        "items": items,
        "image_bytes": [_image(1, "PNG"), None, gif.getvalue(), _image(2, "WEBP")],
        "metadata": json.dumps({"licence": "cc-by-4.0"}), "quality_score": 0.75}]),
        tmp_path / "outputs" / "docs.parquet")
    [sample] = samples_from_docs(tmp_path)
    rec = sample["json"]
    assert rec["key"] == doc and rec["licence"] == "cc-by-4.0"
    assert rec["scores"] == {"quality_score": 0.75}
    assert [(i["type"], i.get("role")) for i in rec["sequence"]] == [
        ("text", "title"), ("text", "text"), ("image", None), ("text", "text"),
        ("image", None), ("image", None)]
    assert sorted(n.split(".", 1)[1] for n in sample["members"]) == ["0.png", "1.png", "2.webp"]
    assert rec["sequence"][5]["alt"] == ""
    out = tmp_path / "shards"
    write_shards([sample], out)
    assert verify_shards(out).ok


def test_shard_files_stay_within_the_size_limit(tmp_path):
    samples = [_sample(i) for i in range(12)]
    limit = 24_000
    summary = write_shards(samples, tmp_path, max_shard_bytes=limit)
    assert len(summary.shards) >= 2
    for shard in summary.shards:
        assert (tmp_path / shard.name).stat().st_size <= limit


def test_non_finite_numbers_are_a_format_error(tmp_path):
    sample = _sample(0)
    bad = {**sample, "json": {**sample["json"], "scores": {"q": float("nan")}}}
    with pytest.raises(ShardFormatError, match="finite"):
        write_shards([bad], tmp_path)


def test_memory_holds_one_sample_not_the_whole_set(tmp_path):
    """Member bytes wait on disk between the check pass and the write pass: writing 40
    samples of 256 KiB (10 MiB) from a generator peaks far below the set's size, and the
    shards are the same bytes as ever (the roll-over and order tests pin those)."""
    import tracemalloc

    big = 256 * 1024

    def samples():
        for i in range(40):
            sample = _sample(i, n_images=1)
            [name] = sample["members"]
            sample["members"][name] = np.random.default_rng(i).bytes(big)  # not decoded here
            yield sample

    tracemalloc.start()
    try:
        summary = write_shards(samples(), tmp_path / "set", max_shard_bytes=3 * big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.n_samples == 40 and len(summary.shards) >= 13
    assert peak < 10 * big, f"peak {peak / 2**20:.1f} MiB for a 10 MiB set"
    assert sorted(p.name for p in (tmp_path / "set").iterdir() if p.name.startswith(".")) == []
    members = 0
    for shard in summary.shards:
        with tarfile.open(tmp_path / "set" / shard.name) as tar:
            members += len(tar.getnames())
    assert members == 80


def test_a_set_that_fails_its_checks_leaves_nothing_behind(tmp_path):
    samples = [_sample(0), _sample(1), _sample(0)]
    with pytest.raises(ShardFormatError, match="duplicate sample key"):
        write_shards(samples, tmp_path / "new")
    assert not (tmp_path / "new").exists()
