"""The training loader: shard sets -> mixture sampling -> plans -> packs, resumable.

Each reader (one DataLoader worker of one rank) reads every dataset of the mixture
through its own disjoint share of whole shards (`assign_shards`: a seeded per-epoch
permutation, split by rank and worker), picks the dataset of each next sample by
`probability` with a seeded RNG of its own, and packs what it reads. Each dataset
runs its own epochs (or, `resampled`, draws shards with replacement forever).

Data state. The DataLoader cannot reach into its workers, so every pack carries the
state of the reader that made it, as of right after that pack: per dataset the epoch,
the shard queue of the epoch (the head is the shard being read, with how many of its
samples were read), the shards finished, the queues of later epochs a redistribution
decided; the reader's RNG; and the overflow buffer as (dataset, epoch, shard, index,
key), re-read on resume. `DataStateTracker` keeps the latest state per reader in the
main process. Packs prefetched but not consumed are simply made again on resume.

Resume continues exactly (same next packs): readers restart from their states and
the physical workers are rotated so the DataLoader's round-robin continues with the
reader that was next. With a different world size or worker count, the unfinished
shards of every epoch in flight are dealt out again (finished ones stay finished, a
partly read shard resumes at its offset, buffered samples move with it), so no sample
repeats within an epoch; this needs every rank's saved state.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from weft.model.mot import UnifiedConfig
from weft.model.packed import PackedBatch
from weft.pipelines.shard import INDEX_NAME, MIXTURE_FILE
from weft.train.config import DataConfig
from weft.train.images import ImageSpec, check_image_config, vit_patch_size
from weft.train.packer import PackStats, PlanPreparer, PreparedPlan, TextTokens, TokenPacker
from weft.train.plans import PlanError, plan_sample
from weft.train.shard_loader import (
    ShardDataset,
    TooFewShardsError,
    assign_shards,
    default_rank_world,
)

log = logging.getLogger(__name__)

STATE_FORMAT = "weft-data-state-v1"
_EMPTY_EPOCHS = 3  # a dataset whose reader finds nothing this many epochs running stops


class DataStateError(ValueError):
    """A saved data state that cannot resume this loader (what changed, what to do)."""


@dataclass(frozen=True)
class DatasetSource:
    name: str
    probability: float
    shard_dir: Path


def dataset_sources(path: str | Path) -> list[DatasetSource]:
    """The datasets of a mixture folder (mixture.json), or the one shard set at `path`."""
    root = Path(path)
    if (root / INDEX_NAME).is_file():
        return [DatasetSource(root.resolve().name or "data", 1.0, root)]
    mixture = root / MIXTURE_FILE
    try:
        datasets = json.loads(mixture.read_text())["datasets"]
        sources = [DatasetSource(str(d["name"]), float(d["probability"]),
                                 (root / d["index"]).parent) for d in datasets]
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data.shards {root}: neither a shard set ({INDEX_NAME}) nor a "
                                f"mixture folder ({MIXTURE_FILE})") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{mixture} is unreadable: {exc}") from exc
    if not sources or any(s.probability <= 0 for s in sources):
        raise ValueError(f"{mixture}: needs datasets, each with a probability > 0")
    if len({s.name for s in sources}) != len(sources):
        raise ValueError(f"{mixture}: dataset names must be unique")
    return sources


@dataclass
class DataPack:
    """What the loader yields: the packed batch, its samples, and the reader's state."""

    batch: PackedBatch
    keys: list[str]  # the sample keys in the pack, in order
    datasets: list[str]  # each sample's dataset
    stats: dict[str, Any]  # token counts per kind, plans cut / skipped / dropped
    reader: tuple[int, int]  # (rank, worker) of the reader that made it
    state: dict[str, Any]  # that reader's data state right after this pack


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(map(str, ("weft-data", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(state: dict[str, Any] | None, *seed: Any) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64(_seed(*seed)))
    if state is not None:
        rng.bit_generator.state = state
    return rng


class _Cursor:
    """One dataset as one reader reads it: the epoch's shard queue and the place in it."""

    def __init__(self, stream: PackedStream, index: int, worker: int,
                 state: dict[str, Any] | None) -> None:
        self.stream, self.worker = stream, worker
        self.source, self.shards = stream.sources[index], stream.datasets[index]
        self.entries = {e.name: e for e in self.shards.shards}
        self._iter: Iterator[dict[str, Any]] | None = None
        s = state or {}
        self.epoch: int = s.get("epoch", 0)
        self.finished: list[str] = list(s.get("finished", []))
        self.pending = {int(k): [list(q) for q in v] for k, v in s.get("pending", {}).items()}
        self.done: bool = s.get("done", False)
        self.draws: int = s.get("draws", 0)
        self.yielded: bool = s.get("yielded", False)
        self.empty_epochs: int = s.get("empty_epochs", 0)
        self.rng = _rng(s.get("rng"), stream.config.seed, "shards", self.source.name,
                        stream.generation, stream.rank, worker)
        self.queue: list[list[Any]] = [list(q) for q in s["queue"]] if state else \
            ([] if stream.config.resampled else self.default_queue(
                self.epoch, stream.world_size, stream.rank, stream.readers, worker))

    def default_queue(self, epoch: int, world: int, rank: int, workers: int,
                      worker: int) -> list[list[Any]]:
        order = assign_shards(len(self.shards.shards), world, rank, workers, worker, epoch,
                              self.stream.dataset_seed(self.source.name))
        return [[self.shards.shards[i].name, 0] for i in order]

    def next(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(sample, where it lies), or None once the dataset is done for this reader."""
        while not self.done:
            if not self.queue:
                self._advance()
                continue
            head = self.queue[0]
            if self._iter is None:
                entry = self.entries[head[0]]
                self._iter = itertools.islice(self.shards.read_shard(entry), head[1], None)
            sample = next(self._iter, None)
            if sample is None:
                self._iter = None
                self.finished.append(self.queue.pop(0)[0])
                continue
            origin = {"dataset": self.source.name, "shard": head[0], "index": head[1],
                      "key": sample["key"],
                      "epoch": self.draws if self.stream.config.resampled else self.epoch}
            head[1] += 1
            self.yielded = True
            return sample, origin
        return None

    def _advance(self) -> None:
        if self.stream.config.resampled:
            self.draws += 1
            pick = int(self.rng.integers(len(self.shards.shards)))
            self.queue = [[self.shards.shards[pick].name, 0]]
            return
        self.empty_epochs = 0 if self.yielded else self.empty_epochs + 1
        limit = self.stream.epochs
        if limit is not None and self.epoch + 1 >= limit:
            self.done = True
            return
        if self.empty_epochs >= _EMPTY_EPOCHS:
            log.warning("dataset %s: reader (%d, %d) read no sample in %d epochs; it stops "
                        "reading it", self.source.name, self.stream.rank, self.worker,
                        self.empty_epochs)
            self.done = True
            return
        self.epoch += 1
        self.finished, self.yielded = [], False
        self.queue = self.pending.pop(self.epoch) if self.epoch in self.pending else \
            self.default_queue(self.epoch, self.stream.world_size, self.stream.rank,
                               self.stream.readers, self.worker)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "queue": [list(q) for q in self.queue],
                "pending": {str(k): [list(q) for q in v] for k, v in self.pending.items()},
                "finished": list(self.finished), "done": self.done, "draws": self.draws,
                "yielded": self.yielded, "empty_epochs": self.empty_epochs,
                "rng": self.rng.bit_generator.state}


class _Reader:
    """One (rank, worker): picks datasets, plans, prepares and packs; knows its state."""

    def __init__(self, stream: PackedStream, worker: int,
                 state: dict[str, Any] | None) -> None:
        self.stream, self.worker = stream, worker
        config = stream.config
        s = state or {}
        datasets = s.get("datasets", {})
        self.cursors = [_Cursor(stream, i, worker, datasets.get(src.name))
                        for i, src in enumerate(stream.sources)]
        self.rng = _rng(s.get("rng"), config.seed, "mix", stream.generation, stream.rank,
                        worker)
        self.packs_made: int = s.get("packs", 0)
        self.saved_overflow: list[dict[str, Any]] = list(s.get("overflow", []))
        self.stats = PackStats()
        self.preparer = PlanPreparer(stream.text, stream.images, config.pack,
                                     config.cfg_dropout, config.seed, self.stats)
        self.packer = TokenPacker(config.pack, stream.images.vit_patch,
                                  stream.images.vae_stride, self.stats)
        self._skips = 0

    def packs(self) -> Iterator[DataPack]:
        self.packer.overflow.extend(self._reread(self.saved_overflow))
        self.stats.drain()  # counted when they were first read
        while (pack := self.packer.next_pack(self._pull)) is not None:
            self.packs_made += 1
            yield DataPack(pack.batch, [p.plan.key for p in pack.plans],
                           [p.plan.dataset for p in pack.plans], pack.stats,
                           (self.stream.rank, self.worker), self.state())

    def state(self) -> dict[str, Any]:
        s = self.stream
        return {"rank": s.rank, "worker": self.worker, "world_size": s.world_size,
                "num_workers": s.readers, "generation": s.generation,
                "packs": self.packs_made, "rng": self.rng.bit_generator.state,
                "datasets": {c.source.name: c.state() for c in self.cursors},
                "overflow": [dict(p.origin or {}) for p in self.packer.overflow]}

    def _prepare(self, sample: dict[str, Any], origin: dict[str, Any]) -> PreparedPlan | None:
        try:
            plan = plan_sample(sample["json"], origin["dataset"])
        except PlanError as exc:
            self.stats.skip("bad_plan")
            log.warning("%s: sample %s has no plan: %s", origin["dataset"], origin["key"], exc)
            return None
        prepared = self.preparer.prepare(plan, sample["images"], origin["epoch"])
        if prepared is not None:
            prepared.origin = origin
        return prepared

    def _pull(self) -> PreparedPlan | None:
        while True:
            active = [c for c in self.cursors if not c.done]
            if not active:
                return None
            weights = np.array([c.source.probability for c in active])
            cursor = active[int(self.rng.choice(len(active), p=weights / weights.sum()))]
            got = cursor.next()
            if got is None:
                continue
            prepared = self._prepare(*got)
            if prepared is not None:
                self._skips = 0
                return prepared
            self._skips += 1
            if self._skips > max(1000, self.stream.n_samples):
                raise RuntimeError(f"reader ({self.stream.rank}, {self.worker}) skipped "
                                   f"{self._skips} samples in a row, none packs: check the "
                                   "image and pack settings (skip reasons are logged)")

    def _reread(self, origins: list[dict[str, Any]]) -> list[PreparedPlan]:
        """The buffered plans of a saved state, read again from their shards, in order."""
        by_shard: dict[tuple[str, str], set[int]] = {}
        for o in origins:
            by_shard.setdefault((o["dataset"], o["shard"]), set()).add(o["index"])
        cursors = {c.source.name: c for c in self.cursors}
        found: dict[tuple[str, str, int], dict[str, Any]] = {}
        for (dataset, shard), wanted in by_shard.items():
            cursor = cursors.get(dataset)
            entry = cursor.entries.get(shard) if cursor else None
            if entry is None:
                raise DataStateError(f"the saved overflow buffer names shard {shard} of "
                                     f"dataset {dataset}, which this loader does not have")
            for i, sample in enumerate(cursor.shards.read_shard(entry)):
                if i in wanted:
                    found[(dataset, shard, i)] = sample
                if i >= max(wanted):
                    break
        plans = []
        for o in origins:
            sample = found.get((o["dataset"], o["shard"], o["index"]))
            if sample is None or sample["key"] != o["key"]:
                raise DataStateError(f"sample {o['key']} is no longer sample {o['index']} of "
                                     f"{o['dataset']}/{o['shard']}: the shards changed since "
                                     "the data state was saved")
            prepared = self._prepare(sample, o)
            if prepared is None:
                raise DataStateError(f"buffered sample {o['key']} no longer packs; the data "
                                     "settings changed since the state was saved")
            plans.append(prepared)
        return plans


class PackedStream(IterableDataset):
    """PackedBatch packs (as DataPack) from a mixture folder or one shard set.

    rank / world_size default to torch.distributed's; `config.num_workers` must be the
    DataLoader's worker count (the shards are split by it). `epochs` None reads
    forever; a number stops each dataset after that many epochs (tests, evaluation).
    `vit_patch` None: a model without a ViT (ViT items are left out of the plans).
    """

    def __init__(self, config: DataConfig, tokenizer: Any, unified: UnifiedConfig, *,
                 rank: int | None = None, world_size: int | None = None,
                 vit_patch: int | None = None, epochs: int | None = None) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together, or neither")
        if rank is None or world_size is None:
            rank, world_size = default_rank_world()
        if epochs is not None and (config.resampled or epochs < 1):
            raise ValueError("epochs must be >= 1, and only without data.resampled")
        check_image_config(config, unified, vit_patch)
        self.config, self.rank, self.world_size, self.epochs = config, rank, world_size, epochs
        self.readers = max(1, config.num_workers)
        self.images = ImageSpec.from_config(config, unified, vit_patch)
        self.text = TextTokens(tokenizer)
        self.sources = dataset_sources(config.shards)
        self.datasets: list[ShardDataset] = []
        for source in self.sources:
            try:
                self.datasets.append(ShardDataset(
                    source.shard_dir, seed=config.seed, rank=rank, world_size=world_size,
                    num_workers=None if config.resampled else self.readers, decode=False))
            except TooFewShardsError as exc:
                raise TooFewShardsError(f"dataset {source.name}: {exc}") from exc
        self.n_samples = sum(d.n_samples for d in self.datasets)
        self.resume: dict[int, dict[str, Any]] = {}  # worker -> state to start from
        self.start_worker = 0  # the reader the DataLoader's first worker plays
        self.generation = 0  # how many redistributions this data stream went through

    def dataset_seed(self, name: str) -> int:
        return _seed(self.config.seed, "dataset", name)

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must agree with to resume (probabilities may change)."""
        text = self.text
        return {
            "shards": {s.name: [[e.name, e.nsamples] for e in d.shards]
                       for s, d in zip(self.sources, self.datasets, strict=True)},
            "seed": self.config.seed, "resampled": self.config.resampled,
            "pack": self.config.pack.model_dump(), "images": self.config.images.model_dump(),
            "cfg_dropout": self.config.cfg_dropout.model_dump(),
            "vit_patch": self.images.vit_patch, "vae_stride": self.images.vae_stride,
            "tokenizer": {"size": len(text.tokenizer), "eos": text.eos,
                          "markers": list(text.markers) if text.markers else None},
        }

    def reader_state(self, worker: int) -> dict[str, Any]:
        """The state reader `worker` starts from (loaded, or fresh)."""
        return self.resume.get(worker) or _Reader(self, worker, None).state()

    def __iter__(self) -> Iterator[DataPack]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.readers:
            raise DataStateError(f"the DataLoader has {workers} worker(s), the stream was "
                                 f"split for data.num_workers={self.config.num_workers}")
        worker = (physical + self.start_worker) % workers
        yield from _Reader(self, worker, self.resume.get(worker)).packs()


def _default_share(stream: PackedStream, cursor: _Cursor, reader: dict[str, Any],
                   epoch: int) -> list[list[Any]]:
    """The shards an old reader would have read in an epoch it had not started."""
    pending = reader["datasets"].get(cursor.source.name, {}).get("pending", {})
    if str(epoch) in pending:
        return [list(q) for q in pending[str(epoch)]]
    return cursor.default_queue(epoch, reader["world_size"], reader["rank"],
                                reader["num_workers"], reader["worker"])


def redistribute(stream: PackedStream, old: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """This rank's reader states after a topology change, from every old reader's state.

    For each dataset and each epoch in flight (from the least advanced old reader's to
    the most advanced one's), what is left unread (queues, partly read shards at their
    offsets, and the epoch shares of readers that had not reached it yet) is dealt out
    round-robin to the new readers; buffered samples likewise. New readers start at
    the oldest epoch in flight. `old` lists the old readers in (rank, worker) order;
    new readers seed their RNGs from `stream.generation`.
    """
    slots = stream.world_size * stream.readers
    mine = range(stream.rank * stream.readers, (stream.rank + 1) * stream.readers)
    new = {slot - mine.start: _Reader(stream, slot - mine.start, None).state()
           for slot in mine}
    for index, source in enumerate(stream.sources):
        if stream.config.resampled:
            continue  # no epochs to keep: new readers draw afresh
        cursor = _Cursor(stream, index, 0, None)
        states = [r["datasets"][source.name] for r in old]
        low, high = min(c["epoch"] for c in states), max(c["epoch"] for c in states)
        left: dict[int, list[list[Any]]] = {}
        for epoch in range(low, high + 1):
            left[epoch] = []
            for reader, c in zip(old, states, strict=True):
                if c["epoch"] < epoch:
                    left[epoch] += _default_share(stream, cursor, reader, epoch)
                elif c["epoch"] == epoch:
                    left[epoch] += [list(q) for q in c["queue"]]
        for slot in mine:
            share = {e: rest[slot::slots] for e, rest in left.items()}
            ds = new[slot - mine.start]["datasets"][source.name]
            ds.update(epoch=low, queue=share[low], finished=[],
                      pending={str(e): q for e, q in share.items() if e > low})
    overflow = [o for r in old for o in r["overflow"]]
    for slot in mine:
        new[slot - mine.start]["overflow"] = overflow[slot::slots]
    return new


class DataStateTracker:
    """The main process's record of each reader's latest data state, for checkpoints.

    Call `observe(pack)` on every pack the trainer takes (or iterate `track(loader)`).
    `state_dict()` is this rank's state (plain Python, JSON-serialisable);
    `load_state_dict(states)` before iterating: this rank's state, or the list of every
    rank's (needed when the world size or the worker count changed). Observed states
    also become the stream's starting point, so a new iterator continues the stream.
    """

    def __init__(self, source: DataLoader | PackedStream) -> None:
        stream = source.dataset if isinstance(source, DataLoader) else source
        if not isinstance(stream, PackedStream):
            raise TypeError("DataStateTracker needs a PackedStream or a DataLoader over one")
        self.stream = stream
        self.last_worker: int | None = None

    def observe(self, pack: DataPack) -> DataPack:
        rank, worker = pack.reader
        if rank != self.stream.rank:
            raise DataStateError(f"a pack of rank {rank} reached the tracker of rank "
                                 f"{self.stream.rank}")
        self.stream.resume[worker] = pack.state
        self.last_worker = worker
        self.stream.start_worker = (worker + 1) % self.stream.readers
        return pack

    def track(self, packs: Iterable[DataPack]) -> Iterator[DataPack]:
        for pack in packs:
            yield self.observe(pack)

    def state_dict(self) -> dict[str, Any]:
        s = self.stream
        return {"format": STATE_FORMAT, "rank": s.rank, "world_size": s.world_size,
                "num_workers": s.readers, "next_worker": s.start_worker,
                "generation": s.generation, "fingerprint": s.fingerprint(),
                "readers": [s.reader_state(w) for w in range(s.readers)]}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        states = [state] if isinstance(state, dict) else list(state)
        s = self.stream
        if not states or any(st.get("format") != STATE_FORMAT for st in states):
            raise DataStateError(f"not a {STATE_FORMAT} data state")
        self._check_fingerprint(states[0]["fingerprint"])
        world, workers = states[0]["world_size"], states[0]["num_workers"]
        if any((st["world_size"], st["num_workers"]) != (world, workers) for st in states):
            raise DataStateError("the data states come from runs of different sizes")
        if (world, workers) == (s.world_size, s.readers):
            mine = [st for st in states if st["rank"] == s.rank]
            if not mine:
                raise DataStateError(f"no data state for rank {s.rank} among ranks "
                                     f"{sorted(st['rank'] for st in states)}")
            s.generation = mine[0]["generation"]
            s.resume = dict(enumerate(mine[0]["readers"]))
            s.start_worker = mine[0]["next_worker"]
            return
        ranks = sorted(st["rank"] for st in states)
        if ranks != list(range(world)):
            raise DataStateError(
                f"the data state was saved by {world} rank(s) x {workers} worker(s); this run "
                f"has {s.world_size} x {s.readers}. Dealing the unread shards out again needs "
                f"every rank's state (got ranks {ranks}): gather tracker.state_dict() from all "
                "ranks when saving (torch.distributed.all_gather_object) and pass the list "
                "to load_state_dict, or run with the old world size and data.num_workers")
        old = [r for st in sorted(states, key=lambda st: st["rank"]) for r in st["readers"]]
        s.generation = max(st["generation"] for st in states) + 1
        s.resume = redistribute(s, old)
        s.start_worker = 0
        log.warning("data state: %d rank(s) x %d worker(s) -> %d x %d; unread shards dealt "
                    "out again%s", world, workers, s.world_size, s.readers,
                    " (resampled: shards are drawn afresh)" if s.config.resampled else "")

    def _check_fingerprint(self, saved: dict[str, Any]) -> None:
        now = self.stream.fingerprint()
        changed = sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))
        if changed:
            raise DataStateError(
                f"the data settings changed since the data state was saved ({', '.join(changed)}"
                f" differ{'s' if len(changed) == 1 else ''}): resume with the saved shards and "
                "data settings, or start the data stream afresh (do not load the data state)")


def _pass_through(pack: DataPack) -> DataPack:
    return pack


def load_tokenizer(path: str | Path) -> Any:
    """A local Hugging Face tokenizer (nothing is downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def build_dataloader(config: DataConfig, tokenizer: Any, unified: UnifiedConfig,
                     rank: int | None = None, world_size: int | None = None, *,
                     vit_patch: int | None = None, epochs: int | None = None) -> DataLoader:
    """A DataLoader of DataPack (batch_size=None, config.num_workers workers).

    tokenizer: a tokenizer, or a local directory; None = config.tokenizer. vit_patch:
    None = read from the SigLIP2 checkpoint at unified.vit_path (no ViT without one).
    """
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer or pass the llm_checkpoint's "
                         "tokenizer")
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    if vit_patch is None:
        vit_patch = vit_patch_size(unified)
    stream = PackedStream(config, tokenizer, unified, rank=rank, world_size=world_size,
                          vit_patch=vit_patch, epochs=epochs)
    workers = config.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_pass_through,
                      prefetch_factor=2 if workers else None, persistent_workers=False)


__all__ = ["DataPack", "DataStateError", "DataStateTracker", "DatasetSource", "PackedStream",
           "build_dataloader", "dataset_sources", "load_tokenizer", "redistribute"]
