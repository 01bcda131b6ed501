"""Reference shard loader: the rank x worker split, refusals, and safe decoding in one process."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weft.pipelines.shard import record_bytes, write_shards
from weft.schemas.ids import hash_of
from weft.train.shard_loader import (
    ShardDataset,
    TooFewShardsError,
    assign_shards,
    default_rank_world,
    read_index,
)


def _image(seed: int, fmt: str, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _sample(i: int) -> dict:
    key = hash_of("loader-sample", i)
    members = {f"{key}.0.png": _image(i, "PNG", (8 + i % 3, 6)),
               f"{key}.1.jpg": _image(i + 100, "JPEG", (10, 4 + i % 2))}
    sequence = [{"type": "text", "role": "caption", "text": f"sample {i}"},
                {"type": "image", "member": f"{key}.0.png"},
                {"type": "video_frame", "member": f"{key}.1.jpg", "time_s": 1.5}]
    record = {"key": key, "kind": "web_doc", "source_id": "src", "parent_ids": [],
              "ledger_item_id": f"item-{i}", "sequence": sequence,
              "scores": {"quality": i / 10}, "licence": None}
    return {"key": key, "json": record, "members": members}


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [_sample(i) for i in range(14)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, samples) -> Path:
    out = tmp_path_factory.mktemp("shards")
    summary = write_shards(samples, out, max_shard_bytes=4_000, seed=1)
    assert len(summary.shards) >= 6
    return out


def _manifest_keys(shard_dir: Path) -> list[str]:
    return pq.read_table(shard_dir / "manifest.parquet").column("key").to_pylist()


# ---- the split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3, 5])
def test_assign_shards_is_disjoint_and_covers_every_shard(world, workers):
    readers = world * max(1, workers)
    for n, epoch, seed in itertools.product(range(readers, readers + 23), (0, 1, 7), (0, 5)):
        lists = [assign_shards(n, world, r, workers, w, epoch, seed)
                 for r in range(world) for w in range(max(1, workers))]
        flat = [i for lst in lists for i in lst]
        assert sorted(flat) == list(range(n)), (n, world, workers, epoch)
        assert max(map(len, lists)) - min(map(len, lists)) <= 1
        assert all(lists), "every reader gets at least one shard"


def test_assign_shards_is_the_same_on_every_call_and_shuffled_per_epoch():
    by_epoch = [[assign_shards(40, 2, r, 2, w, e, 3) for r in range(2) for w in range(2)]
                for e in range(3)]
    assert by_epoch[0] == [assign_shards(40, 2, r, 2, w, 0, 3) for r in range(2)
                           for w in range(2)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    assert by_epoch[0] != [assign_shards(40, 2, r, 2, w, 0, 4) for r in range(2)
                           for w in range(2)]
    assert sorted(i for lst in by_epoch[1] for i in lst) == list(range(40))


def test_too_few_shards_is_refused_with_the_numbers_and_the_fix():
    with pytest.raises(TooFewShardsError) as err:
        assign_shards(3, 2, 0, 2, 0, 0, 0)
    msg = str(err.value)
    assert "3 shard(s)" in msg and "2 rank(s) x 2 DataLoader worker(s) = 4 readers" in msg
    assert "max_shard_bytes" in msg and "fewer DataLoader workers (at most 1 per rank" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(TooFewShardsError, match="use fewer ranks"):
        assign_shards(1, 2, 0, 0, 0, 0, 0)


def test_bad_rank_or_worker_is_a_plain_value_error():
    with pytest.raises(ValueError, match="rank must be"):
        assign_shards(10, 2, 2, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="worker_id must be"):
        assign_shards(10, 2, 0, 2, 2, 0, 0)


# ---- the dataset in one process ----------------------------------------------------------------
def test_dataset_refuses_too_many_workers_at_construction(shard_dir):
    n = len(read_index(shard_dir))
    with pytest.raises(TooFewShardsError, match=rf"{n} shard\(s\) for 2 rank\(s\)") as err:
        ShardDataset(shard_dir, rank=0, world_size=2, num_workers=n)
    assert "bytes or less for this set" in str(err.value)
    ShardDataset(shard_dir, rank=0, world_size=2, num_workers=n // 2)  # enough


def test_rank_and_world_default_to_a_single_process_without_a_group(shard_dir):
    assert default_rank_world() == (0, 1)
    ds = ShardDataset(shard_dir)
    assert (ds.rank, ds.world_size) == (0, 1)
    with pytest.raises(ValueError, match="together"):
        ShardDataset(shard_dir, rank=1)


def test_two_ranks_read_every_sample_once_with_valid_records_and_images(shard_dir, samples):
    by_key = {s["key"]: s for s in samples}
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            ds = ShardDataset(shard_dir, rank=rank, world_size=2, seed=9)
            ds.set_epoch(epoch)
            for s in ds:
                assert s["__rank__"] == rank and s["__worker__"] == 0
                assert s["__shard__"] in {e.name for e in ds.my_shards()}
                src = by_key[s["key"]]
                assert record_bytes(s["json"]) == record_bytes(src["json"])
                assert list(s["images"]) == [f"{s['key']}.0.png", f"{s['key']}.1.jpg"]
                for name, image in s["images"].items():
                    want = Image.open(io.BytesIO(src["members"][name]))
                    assert isinstance(image, Image.Image) and image.size == want.size
                    assert image.format == want.format
                seen.append(s["key"])
            assert ds.stats.bad_samples == ds.stats.unsafe_members == ds.stats.bad_shards == 0
        assert sorted(seen) == sorted(_manifest_keys(shard_dir))


def test_decode_false_gives_the_written_bytes_in_shard_order(shard_dir, samples):
    by_key = {s["key"]: s for s in samples}
    ds = ShardDataset(shard_dir, decode=False)
    got = list(ds)
    assert [s["key"] for s in got] == [k for e in ds.my_shards() for k in _keys_of(shard_dir,
                                                                                    e.name)]
    for s in got:
        assert s["images"] == {n: by_key[s["key"]]["members"][n] for n in s["images"]}
    assert ds.stats.samples == len(samples) and ds.stats.shards == len(ds.shards)
    ds.set_epoch(1)
    assert [s["key"] for s in ds] != [s["key"] for s in got]


def _keys_of(shard_dir: Path, shard: str) -> list[str]:
    rows = pq.read_table(shard_dir / "manifest.parquet").to_pylist()
    return [r["key"] for r in rows if r["shard"] == shard]


# ---- damaged or hostile shard sets -------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE,
         link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _hand_made(root: Path, build) -> Path:
    root.mkdir()
    path = root / "shard-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        build(tar)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "x",
             "shardlist": [{"url": path.name, "nsamples": 2,
                            "filesize": path.stat().st_size}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_unsafe_members_are_skipped_and_counted_never_extracted(tmp_path, samples):
    good, bad = samples[0], samples[1]
    victim = tmp_path / "victim"

    def build(tar):
        _add(tar, "../evil.json", b"{}")
        _add(tar, str(victim), b"pwned")
        _add(tar, f"{good['key']}.json", record_bytes(good["json"]))
        for name, data in good["members"].items():
            _add(tar, name, data)
        _add(tar, f"{good['key']}.9.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(tar, f"{good['key']}.exe", b"MZ")
        _add(tar, f"sub/{bad['key']}.json", record_bytes(bad["json"]))

    root = _hand_made(tmp_path / "hostile", build)
    ds = ShardDataset(root)
    got = list(ds)
    assert [s["key"] for s in got] == [good["key"]]
    assert ds.stats.unsafe_members == 5 and ds.stats.bad_samples == 0
    assert not victim.exists() and not (tmp_path / "evil.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["index.json", "shard-000000.tar"]


def test_invalid_records_are_skipped_and_the_rest_still_read(tmp_path, samples):
    a, b, c = samples[2], samples[3], samples[4]
    broken = dict(b["json"], kind="podcast")

    def build(tar):
        for s, record in ((a, a["json"]), (b, broken), (c, c["json"])):
            _add(tar, f"{s['key']}.json", record_bytes(record))
            for name, data in s["members"].items():
                _add(tar, name, data if s is not c else b"not an image")
        _add(tar, f"{samples[5]['key']}.0.png", samples[5]["members"][
            f"{samples[5]['key']}.0.png"])  # no json member

    ds = ShardDataset(_hand_made(tmp_path / "broken", build))
    assert [s["key"] for s in ds] == [a["key"]]
    assert ds.stats.bad_samples == 3  # invalid kind, undecodable image, no record
    assert [s["key"] for s in ShardDataset(tmp_path / "broken", decode=False)] == \
        [a["key"], c["key"]]  # without decoding the bytes are passed on as they are


def test_shard_of_the_wrong_size_is_skipped(tmp_path, shard_dir):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shard_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    first = read_index(copy)[0]
    first.path.write_bytes(first.path.read_bytes()[:-1024])
    ds = ShardDataset(copy, decode=False)
    keys = [s["key"] for s in ds]
    assert ds.stats.bad_shards == 1
    assert sorted(keys) == sorted(set(_manifest_keys(copy)) - set(_keys_of(copy, first.name)))


@pytest.mark.parametrize("url", ["../shard-000000.tar", "/etc/shard-000000.tar",
                                 "sub/shard-000000.tar", "shard-000000.tar.gz", None])
def test_index_urls_outside_the_directory_are_refused(tmp_path, url):
    tmp_path.joinpath("index.json").write_text(json.dumps(
        {"__kind__": "wids-shard-index-v1", "wids_version": 1,
         "shardlist": [{"url": url, "nsamples": 1}]}))
    with pytest.raises(ValueError, match="plain shard file name"):
        ShardDataset(tmp_path)


def test_a_shard_symlinked_out_of_the_directory_is_refused(tmp_path, shard_dir):
    root = tmp_path / "links"
    root.mkdir()
    (root / "shard-000000.tar").symlink_to(shard_dir / "shard-000000.tar")
    (root / "index.json").write_text(json.dumps(
        {"__kind__": "wids-shard-index-v1", "wids_version": 1,
         "shardlist": [{"url": "shard-000000.tar", "nsamples": 1}]}))
    with pytest.raises(ValueError, match="resolves outside"):
        read_index(root)
    (root / "index.json").write_text(json.dumps({"__kind__": "other", "shardlist": []}))
    with pytest.raises(ValueError, match="not a wids-shard-index-v1"):
        read_index(root)
