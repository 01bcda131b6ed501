"""Shard writing and reading throughput against plain tarfile, measured in the same run.

Builds N synthetic samples (real JPEG bytes of a few sizes, JSON records) and prints
samples/s and MB/s, best of --repeat, with the speed ratio to tarfile (ours / tarfile):
  - write: `write_shards` (checks, shuffle, sha256, index, manifest) vs `tarfile`
    writing the same members into shards of the same size limit
  - read:  the reference loader (one process, decode=False: records parsed and
    validated, image bytes not decoded) and `webdataset.WebDataset` vs `tarfile`
    reading every member's bytes; reads come from the page cache (the shards were
    just written), so they measure the readers, not the disk

    python bench/shards.py [--samples 4000] [--sizes 64 128 256] [--shard-mb 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def jpeg_pool(sizes: list[int], per_size: int = 8, seed: int = 0) -> list[bytes]:
    """A few distinct JPEGs per size: smooth gradients plus noise, so they compress like
    photos rather than like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    pool = []
    for side in sizes:
        y, x = np.mgrid[0:side, 0:side]
        for _ in range(per_size):
            base = np.stack([(x * rng.uniform(0.5, 2) + y * rng.uniform(0.5, 2)) % 256] * 3, -1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            pool.append(buf.getvalue())
    return pool


def make_samples(n: int, sizes: list[int]) -> list[dict[str, Any]]:
    """n samples of 1-3 JPEG frames and a caption each."""
    from weft.schemas.ids import hash_of

    pool = jpeg_pool(sizes)
    samples = []
    for i in range(n):
        key = hash_of("bench-shards", i)
        members, sequence = {}, []
        for j in range(1 + i % 3):
            name = f"{key}.{j}.jpg"
            members[name] = pool[(i * 7 + j) % len(pool)]
            sequence.append({"type": "video_frame", "member": name, "time_s": j * 0.5})
        sequence.append({"type": "text", "role": "caption", "text": f"bench clip {i} " * 8})
        record = {"key": key, "kind": "video_clip", "source_id": f"src-{i % 50}",
                  "parent_ids": [f"src-{i % 50}"], "ledger_item_id": f"clip-{i}",
                  "sequence": sequence, "scores": {"quality": (i % 100) / 100},
                  "licence": "CC-BY-4.0"}
        samples.append({"key": key, "json": record, "members": members})
    return samples


def plain_tar_write(samples: list[dict[str, Any]], out: Path, max_bytes: int) -> int:
    """The same members written with bare tarfile, rolling over at the same limit."""
    from weft.pipelines.shard import record_bytes

    groups: list[list[tuple[str, bytes]]] = []
    size = 0
    for s in samples:
        members = [(f"{s['key']}.json", record_bytes(s["json"])), *s["members"].items()]
        need = sum(512 + -(-len(d) // 512) * 512 for _, d in members)
        if not groups or (size and size + need > max_bytes):
            groups.append([])
            size = 0
        groups[-1] += members
        size += need
    out.mkdir(parents=True, exist_ok=True)
    for index, group in enumerate(groups):
        with tarfile.open(out / f"plain-{index:06d}.tar", "w") as tar:
            for name, data in group:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(groups)


def plain_tar_read(paths: list[Path]) -> int:
    """Samples in the shards, reading every member's bytes with bare tarfile."""
    n, last = 0, None
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                assert len(data) == info.size
                key = info.name.partition(".")[0]
                if key != last:
                    n, last = n + 1, key
    return n


def ours_read(shard_dir: Path) -> int:
    from weft.train.shard_loader import ShardDataset

    return sum(1 for _ in ShardDataset(shard_dir, decode=False))


def wds_read(paths: list[Path]) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """(fastest seconds, the count fn returned) over `repeat` runs."""
    times, count = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - start)
    return min(times), count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256],
                        help="square JPEG sides in pixels")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="max_shard_bytes in MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # imported before any timing: the loader pulls in torch (~2 s), which a one-repeat
    # run would otherwise count as reading time
    import webdataset  # noqa: F401

    import weft.train.shard_loader  # noqa: F401
    from weft.pipelines.shard import write_shards

    samples = make_samples(args.samples, args.sizes)
    max_bytes = int(args.shard_mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_ours_w, _ = best(lambda: write_shards(samples, root / "ours", seed=0,
                                                max_shard_bytes=max_bytes).n_samples,
                           args.repeat)
        t_tar_w, n_plain = best(lambda: plain_tar_write(samples, root / "plain", max_bytes),
                                args.repeat)
        ours = sorted((root / "ours").glob("shard-*.tar"))
        mb = sum(p.stat().st_size for p in ours) / 1e6
        n = len(samples)
        print(f"{n} samples, {sum(len(s['members']) for s in samples)} JPEGs "
              f"({'/'.join(map(str, args.sizes))} px), {mb:.1f} MB in {len(ours)} shards "
              f"(plain tarfile: {n_plain}), best of {args.repeat}")
        rows = [("write  tarfile (reference)", t_tar_w, n, t_tar_w),
                ("write  weft write_shards", t_ours_w, n, t_tar_w)]
        t_tar_r, c_tar = best(lambda: plain_tar_read(ours), args.repeat)
        t_ours_r, c_ours = best(lambda: ours_read(root / "ours"), args.repeat)
        t_wds_r, c_wds = best(lambda: wds_read(ours), args.repeat)
        assert c_tar == c_ours == c_wds == n, (c_tar, c_ours, c_wds, n)
        rows += [("read   tarfile (reference)", t_tar_r, n, t_tar_r),
                 ("read   weft ShardDataset", t_ours_r, n, t_tar_r),
                 ("read   webdataset.WebDataset", t_wds_r, n, t_tar_r)]
    print(f"{'':32}{'samples/s':>12}{'MB/s':>10}{'vs tarfile':>12}")
    for name, t, count, ref in rows:
        print(f"{name:32}{count / t:12.0f}{mb / t:10.1f}{ref / t:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
