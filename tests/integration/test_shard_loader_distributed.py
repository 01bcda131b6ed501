"""The shard loader in a real 2-rank gloo job with 2 DataLoader workers per rank, and the
same shards read by plain webdataset and by wids."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from weft.pipelines.shard import write_shards
from weft.schemas.ids import hash_of
from weft.train.shard_loader import ShardDataset, TooFewShardsError

pytestmark = pytest.mark.integration

_RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from weft.train.shard_loader import ShardDataset

    shard_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="env://")
    ds = ShardDataset(shard_dir, seed=11, num_workers=2)  # rank and world from the group
    loader = DataLoader(ds, num_workers=2, batch_size=None)
    epochs = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        epochs[epoch] = [[s["key"], s["__rank__"], s["__worker__"], s["__shard__"],
                          sorted(im.size for im in s["images"].values())] for s in loader]
    dist.barrier()
    with open(out, "w") as fh:
        json.dump({"rank": dist.get_rank(), "world": dist.get_world_size(),
                   "epochs": epochs}, fh)
    dist.destroy_process_group()
""")


def _image(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        key = hash_of("dist-loader", i)
        ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
        name = f"{key}.0.{ext}"
        record = {"key": key, "kind": "video_clip", "source_id": f"s{i % 3}",
                  "parent_ids": [], "ledger_item_id": f"clip-{i}", "scores": {},
                  "sequence": [{"type": "video_frame", "member": name, "time_s": i / 2},
                               {"type": "text", "role": "caption", "text": f"clip {i}"}]}
        out.append({"key": key, "json": record, "members": {name: _image(i, fmt)}})
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-shards")
    summary = write_shards(_samples(40), out, max_shard_bytes=6_000, seed=2)
    assert len(summary.shards) >= 9
    return out


def _manifest(shard_dir: Path) -> list[dict]:
    return pq.read_table(shard_dir / "manifest.parquet").to_pylist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_read_every_sample_once_per_epoch(shard_dir, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(shard_dir),
                               str(tmp_path / f"rank{r}.json")],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]

    manifest = _manifest(shard_dir)
    shard_of = {row["key"]: row["shard"] for row in manifest}
    orders = []
    for epoch in ("0", "1"):
        rows = [row for res in results for row in res["epochs"][epoch]]
        counts = Counter(key for key, *_ in rows)
        assert set(counts) == set(shard_of) and set(counts.values()) == {1}, epoch
        readers: dict[tuple[int, int], set[str]] = {}
        for key, rank, worker, shard, sizes in rows:
            assert shard == shard_of[key] and sizes == [[8, 6]]
            readers.setdefault((rank, worker), set()).add(shard)
        assert sorted(readers) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # nobody idle
        union = [s for shards in readers.values() for s in shards]
        assert len(union) == len(set(union))  # whole shards, never split across readers
        orders.append([[key for key, *_ in res["epochs"][epoch]] for res in results])
    assert orders[0] != orders[1]


def test_fewer_shards_than_ranks_times_workers_is_refused(tmp_path):
    out = tmp_path / "three"
    assert len(write_shards(_samples(3), out, max_shard_bytes=1_500).shards) == 3
    with pytest.raises(TooFewShardsError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 DataLoader "
                                                r"worker\(s\) = 4 readers") as err:
        ShardDataset(out, rank=0, world_size=2, num_workers=2)
    assert "max_shard_bytes" in str(err.value) and "fewer DataLoader workers" in str(err.value)
    # Without num_workers the dataset cannot know; the worker refuses once it sees the count.
    ds = ShardDataset(out, rank=1, world_size=2)
    with pytest.raises(TooFewShardsError, match="4 readers"):
        list(DataLoader(ds, num_workers=2, batch_size=None))
    assert len(list(DataLoader(ds, num_workers=1, batch_size=None))) >= 1


def test_plain_webdataset_reads_the_shards(shard_dir):
    import webdataset as wds

    manifest = _manifest(shard_dir)
    urls = [str(shard_dir / f"shard-{i:06d}.tar") for i in range(len({r["shard"]
                                                                        for r in manifest}))]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=True))
    assert [s["__key__"] for s in got] == [r["key"] for r in manifest]
    for s in got:
        record = json.loads(s["json"])
        assert record["key"] == s["__key__"]
        (suffix,) = [k for k in s if k.startswith("0.")]
        with Image.open(io.BytesIO(s[suffix])) as image:
            image.load()
            assert image.size == (8, 6)
            assert {"JPEG": "0.jpg", "PNG": "0.png"}[image.format] == suffix


def test_wids_reads_the_index(shard_dir, tmp_path):
    import wids

    manifest = _manifest(shard_dir)
    # Relative urls resolve against the index file's directory (wids' default base);
    # cache_dir keeps wids' local copies out of the shard dir and /tmp/_wids_cache.
    ds = wids.ShardListDataset(str(shard_dir / "index.json"), cache_dir=str(tmp_path / "c"),
                               transformations=[])  # raw streams; no deprecated "PIL"
    try:
        assert len(ds) == len(manifest)
        for i in (0, len(ds) // 2, len(ds) - 1):
            sample = ds[i]
            assert sample["__key__"] == manifest[i]["key"]
            record = json.load(sample[".json"])  # wids hands out BytesIO streams
            assert record["key"] == manifest[i]["key"]
            (suffix,) = [k for k in sample if k.startswith(".0.")]
            assert Image.open(sample[suffix]).size == (8, 6)
            assert sample["__shard__"] == str(shard_dir / manifest[i]["shard"])
    finally:
        ds.close()
