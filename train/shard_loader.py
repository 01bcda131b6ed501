"""The reference loader for a weft shard set: whole shards, split by rank and by worker.

Every reader (one DataLoader worker on one rank) gets a disjoint set of whole shards,
so an epoch reads each sample exactly once across the job without any coordination:
each rank draws the same seeded per-epoch permutation of the shard list and takes
every `world_size * num_workers`-th shard from its own slot. The split is the pure
function `assign_shards`, so it can be checked without processes.

Tars are read with `tarfile` as a stream, never extracted: a member whose name is not
a safe `{key}.json` / `{key}.{n}.{ext}` is skipped, and so is a sample whose record
does not validate; each skip is logged and counted in `ShardDataset.stats` (per
process: a DataLoader worker counts its own). Rank and world size are read from
`torch.distributed` when the dataset is built, as `DistributedSampler` does, so build it
after `init_process_group`. `set_epoch` reaches the workers only when they are started
anew for each epoch (the DataLoader default, `persistent_workers=False`).

What this leaves to the trainer (a later issue): sequence plans, packing, resumable
state, and evening out ranks whose shards hold different numbers of samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from weft.pipelines.shard import INDEX_NAME, safe_shard_name
from weft.schemas.shards import INDEX_KIND, ShardFormatError, safe_member_name, validate_record

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMBER_BYTES = 256 << 20


class TooFewShardsError(ValueError):
    """Fewer shards than readers: some rank or worker would get no data at all."""


def check_enough_shards(n_shards: int, world_size: int, num_workers: int,
                        total_bytes: int | None = None) -> None:
    """Raise TooFewShardsError unless every (rank, worker) can get at least one shard."""
    readers = world_size * num_workers
    if n_shards >= readers:
        return
    smaller = ""
    if total_bytes:
        smaller = f", about {max(1, total_bytes // readers):,} bytes or less for this set"
    fewer = (f"use fewer DataLoader workers (at most {n_shards // world_size} per rank here)"
             if n_shards >= world_size else
             f"use fewer ranks (at most {n_shards} with one worker each)")
    raise TooFewShardsError(
        f"{n_shards} shard(s) for {world_size} rank(s) x {num_workers} DataLoader worker(s) "
        f"= {readers} readers: each reader needs at least one whole shard. Write smaller "
        f"shards (write_shards(max_shard_bytes=...){smaller}) so there are at least "
        f"{readers}, or {fewer}.")


def epoch_permutation(n_shards: int, epoch: int, seed: int) -> list[int]:
    """The shard order of one epoch: the same on every process for the same seed and epoch."""
    digest = hashlib.sha256(f"weft-shard-loader:{seed}:{epoch}".encode()).digest()
    order = list(range(n_shards))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def assign_shards(n_shards: int, world_size: int, rank: int, num_workers: int,
                  worker_id: int, epoch: int, seed: int) -> list[int]:
    """The shard indices reader (rank, worker_id) reads in this epoch, in reading order.

    The readers' lists are disjoint and together cover all shards; their lengths
    differ by at most one. `num_workers` 0 (loading in the main process) counts as 1.
    """
    num_workers = max(1, num_workers)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) with world_size >= 1, got {rank}")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id must be in [0, {num_workers}), got {worker_id}")
    check_enough_shards(n_shards, world_size, num_workers)
    slot = rank * num_workers + worker_id
    return epoch_permutation(n_shards, epoch, seed)[slot::world_size * num_workers]


@dataclass(frozen=True)
class ShardEntry:
    name: str
    path: Path
    nsamples: int
    filesize: int | None


def read_index(shard_dir: str | Path) -> list[ShardEntry]:
    """The shards `index.json` lists; ValueError when it is not a weft shard index or a
    shard name is not a plain file name in the directory (no path ever leaves it)."""
    root = Path(shard_dir).resolve()
    try:
        index = json.loads((root / INDEX_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{root / INDEX_NAME}: unreadable shard index: {exc}") from exc
    if not isinstance(index, dict) or index.get("__kind__") != INDEX_KIND \
            or index.get("wids_version") != 1 or not isinstance(index.get("shardlist"), list):
        raise ValueError(f"{root / INDEX_NAME}: not a {INDEX_KIND} shard index")
    entries: list[ShardEntry] = []
    for entry in index["shardlist"]:
        if not isinstance(entry, dict):
            raise ValueError(f"{INDEX_NAME}: shard entry {entry!r} is not an object")
        name = safe_shard_name(entry.get("url"))
        path = root / name
        if path.resolve().parent != root:  # a symlink pointing elsewhere
            raise ValueError(f"{INDEX_NAME}: shard {name} resolves outside {root}")
        nsamples, filesize = entry.get("nsamples"), entry.get("filesize")
        if not isinstance(nsamples, int) or (filesize is not None
                                             and not isinstance(filesize, int)):
            raise ValueError(f"{INDEX_NAME}: shard {name} needs integer nsamples/filesize")
        entries.append(ShardEntry(name, path, nsamples, filesize))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{INDEX_NAME}: a shard is listed twice")
    return entries


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class LoaderStats:
    """What one process read and skipped (skips are also logged)."""
    shards: int = 0
    samples: int = 0
    unsafe_members: int = 0  # bad name, not a regular file, or too large
    bad_samples: int = 0  # record missing, unparsable or invalid, or an image not decoding
    bad_shards: int = 0  # missing, wrong size, or unreadable tar

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ShardDataset(IterableDataset):
    """Decoded samples of the shards this (rank, worker) owns in the current epoch.

    Each sample: `key`, `json` (the validated record), `images` (member name -> PIL
    image, or the raw bytes with decode=False, in sequence order), `__shard__`,
    `__rank__`, `__worker__`. Samples come shard by shard, in tar order.
    """

    def __init__(self, shard_dir: str | Path, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, num_workers: int | None = None,
                 decode: bool = True, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.shards = read_index(self.shard_dir)
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together, or neither")
        if rank is None or world_size is None:
            rank, world_size = default_rank_world()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = 0
        self.decode = decode
        self.max_member_bytes = max_member_bytes
        self.stats = LoaderStats()
        if num_workers is not None:
            self._check(max(1, num_workers))

    @property
    def n_samples(self) -> int:
        """Samples in the whole shard set, as the index counts them."""
        return sum(e.nsamples for e in self.shards)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard permutation the next iteration reads."""
        self.epoch = epoch

    def _check(self, num_workers: int) -> None:
        total = sum(e.filesize or 0 for e in self.shards)
        check_enough_shards(len(self.shards), self.world_size, num_workers, total)

    def my_shards(self, num_workers: int = 1, worker_id: int = 0) -> list[ShardEntry]:
        """The shards reader (this rank, worker_id) reads in the current epoch."""
        self._check(max(1, num_workers))
        order = assign_shards(len(self.shards), self.world_size, self.rank, num_workers,
                              worker_id, self.epoch, self.seed)
        return [self.shards[i] for i in order]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info else (1, 0)
        for entry in self.my_shards(num_workers, worker_id):
            for sample in self.read_shard(entry):
                sample["__rank__"], sample["__worker__"] = self.rank, worker_id
                yield sample

    # ---- one shard -----------------------------------------------------------------------------
    def read_shard(self, entry: ShardEntry) -> Iterator[dict[str, Any]]:
        """The valid samples of one shard; problems are skipped, logged and counted."""
        try:
            size = entry.path.stat().st_size
        except OSError as exc:
            self._bad_shard(entry, f"unreadable: {exc}")
            return
        if entry.filesize is not None and size != entry.filesize:
            self._bad_shard(entry, f"{size} bytes, the index says {entry.filesize}")
            return
        self.stats.shards += 1
        seen: set[str] = set()
        try:
            for key, members in self._groups(entry):
                if key in seen:
                    self._bad_sample(entry, key, "its members are split into two groups")
                    continue
                seen.add(key)
                sample = self._sample(entry, key, members)
                if sample is not None:
                    self.stats.samples += 1
                    yield sample
        except (tarfile.TarError, OSError, EOFError) as exc:
            self._bad_shard(entry, f"unreadable tar after {len(seen)} samples: {exc}")

    def _groups(self, entry: ShardEntry) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {member: bytes}) for each run of consecutive safe members sharing a key."""
        key: str | None = None
        members: dict[str, bytes] = {}
        with tarfile.open(entry.path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # tarfile keeps every header otherwise
                name = self._safe(entry, info)
                if name is None:
                    continue
                stem = name.partition(".")[0]
                if stem != key:
                    if key is not None:
                        yield key, members
                    key, members = stem, {}
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {name} is truncated")
                if name in members:
                    self._skip_member(entry, name, "appears twice in one sample")
                    continue
                members[name] = data
        if key is not None:
            yield key, members

    def _safe(self, entry: ShardEntry, info: tarfile.TarInfo) -> str | None:
        if not info.isreg():
            self._skip_member(entry, info.name, "is not a regular file")
            return None
        if info.size > self.max_member_bytes:
            self._skip_member(entry, info.name, f"is {info.size} bytes, over "
                                                f"max_member_bytes {self.max_member_bytes}")
            return None
        try:
            return safe_member_name(info.name)
        except ShardFormatError as exc:
            self._skip_member(entry, info.name, str(exc))
            return None

    def _sample(self, entry: ShardEntry, key: str,
                members: dict[str, bytes]) -> dict[str, Any] | None:
        raw = members.get(f"{key}.json")
        if raw is None:
            self._bad_sample(entry, key, "no json member")
            return None
        images = {n: d for n, d in members.items() if n != f"{key}.json"}
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or record.get("key") != key:
                raise ShardFormatError("the record's key is not the member key")
            order = validate_record(record, set(images))
        except (ValueError, UnicodeDecodeError) as exc:  # ShardFormatError is a ValueError
            self._bad_sample(entry, key, f"invalid record: {exc}")
            return None
        out: dict[str, Any] = {}
        for name in order:
            try:
                out[name] = _open_image(images[name]) if self.decode else images[name]
            except Exception as exc:  # any decoder failure drops the sample, not the worker
                self._bad_sample(entry, key, f"image {name} does not decode: {exc}")
                return None
        return {"key": key, "json": record, "images": out, "__shard__": entry.name}

    # ---- counting problems ---------------------------------------------------------------------
    def _skip_member(self, entry: ShardEntry, name: str, why: str) -> None:
        self.stats.unsafe_members += 1
        log.warning("%s: skipped member %r: %s", entry.name, name, why)

    def _bad_sample(self, entry: ShardEntry, key: str, why: str) -> None:
        self.stats.bad_samples += 1
        log.warning("%s: skipped sample %s: %s", entry.name, key, why)

    def _bad_shard(self, entry: ShardEntry, why: str) -> None:
        self.stats.bad_shards += 1
        log.warning("%s: skipped shard: %s", entry.name, why)


def _open_image(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


__all__ = [
    "LoaderStats", "ShardDataset", "ShardEntry", "TooFewShardsError", "assign_shards",
    "check_enough_shards", "default_rank_world", "epoch_permutation", "read_index",
]
