"""Write training samples to deterministic WebDataset shards, and verify a shard set.

`write_shards` takes samples `{"key": str, "json": dict, "members": {name: bytes}}` (plus
optional `dataset`, `run_id`, `run_dir`, which go to the manifest only)
(format: `weft.schemas.shards`), orders them by key, shuffles that order with
`random.Random(seed)`, and writes `{prefix}-{index:06d}.tar` files with fixed tar
metadata, so the same samples and seed give byte-identical shards. A shard rolls over
before a sample would take its file (tar padding included) past `max_shard_bytes` (a
sample larger than the limit gets a shard of its own). Next to the shards: `index.json`
(a wids shard index, with each shard's size and sha256) and `manifest.parquet` (one row
per sample).

The shuffle needs every key before the first shard is written, but not every sample's
bytes: the first pass checks each sample and appends its members to a scratch file in
`out_dir`, keeping only (key, member offsets, manifest fields) in memory; the second
reads each sample back in shard order. Memory stays at one sample's bytes however large
the set; the disk holds the set twice until the last shard is written (the scratch file
is unlinked at creation, so it goes whatever happens).

`verify_shards` reads a shard set back in full and reports every problem it finds;
it never raises for a damaged shard set.

The samples come from `weft.pipelines.shard_samples` (the pipelines' outputs as samples).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from weft.schemas.run_dir import write_atomic
from weft.schemas.shards import (
    IMAGE_EXTS,
    INDEX_KIND,
    MANIFEST_SCHEMA,
    SHARD_FORMAT_VERSION,
    ShardFormatError,
    check_key,
    json_member,
    safe_member_name,
    validate_record,
)

DEFAULT_MAX_SHARD_BYTES = 1_000_000_000
INDEX_NAME = "index.json"
MIXTURE_FILE = "mixture.json"  # shard sets and their sampling weights (pipelines/mixture.py)
MANIFEST_NAME = "manifest.parquet"
TAR_MTIME = 0
TAR_MODE = 0o644
_BLOCK = tarfile.BLOCKSIZE
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")


# ---- writing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    name: str
    nsamples: int
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSetSummary:
    out_dir: str
    shards: list[ShardInfo]
    n_samples: int
    index_path: str
    manifest_path: str
    seed: int
    max_shard_bytes: int
    format_version: int = SHARD_FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def record_bytes(record: dict[str, Any]) -> bytes:
    """The canonical bytes of a sample record (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def _member_sort_key(name: str) -> tuple[int, int]:
    suffix = name.partition(".")[2]
    return (-1, 0) if suffix == "json" else (int(suffix.split(".")[0]), 0)


def _entry_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _file_bytes(entries: int) -> int:
    """A tar file's size: its entries, the end-of-archive marker, padded to whole records."""
    record = tarfile.RECORDSIZE
    return -(-(entries + 2 * _BLOCK) // record) * record


_ORIGIN = ("dataset", "run_id", "run_dir")


def _prepare(sample: dict[str, Any]) -> tuple[str, list[tuple[str, bytes]], dict[str, Any]]:
    """(key, [(member, bytes)] in tar order, its manifest fields) after checking it."""
    key = check_key(sample.get("key"))
    record = sample.get("json")
    if not isinstance(record, dict) or record.get("key") != key:
        raise ShardFormatError(f"sample {key}: json must be a record whose key is the key")
    members = dict(sample.get("members") or {})
    for name, data in members.items():
        safe_member_name(name, key)
        if name.endswith(".json"):
            raise ShardFormatError(f"sample {key}: the json member comes from 'json'")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ShardFormatError(f"sample {key}: member {name} must be bytes")
    validate_record(record, set(members))
    ordered = [(json_member(key), record_bytes(record))]
    ordered += [(n, bytes(members[n])) for n in sorted(members, key=_member_sort_key)]
    origin = {k: sample.get(k) for k in _ORIGIN}
    for k, v in origin.items():
        if v is not None and not isinstance(v, str):
            raise ShardFormatError(f"sample {key}: {k} must be a string")
    meta = {"kind": record["kind"], "source_id": record.get("source_id"),
            "ledger_item_id": record.get("ledger_item_id"),
            "json_sha256": hashlib.sha256(ordered[0][1]).hexdigest(),
            "scores": json.dumps(record.get("scores") or {}, sort_keys=True), **origin}
    return key, ordered, meta


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Spill:
    """Members' bytes in a scratch file, read back by (offset, length)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def add(self, members: list[tuple[str, bytes]]) -> list[tuple[str, int, int]]:
        refs = []
        for name, data in members:
            refs.append((name, self.file.tell(), len(data)))
            self.file.write(data)
        return refs

    def read(self, refs: list[tuple[str, int, int]]) -> list[tuple[str, bytes]]:
        out = []
        for name, offset, length in refs:
            self.file.seek(offset)
            out.append((name, self.file.read(length)))
        self.file.seek(0, io.SEEK_END)
        return out


_Entry = tuple[str, list[tuple[str, int, int]], dict[str, Any]]


def _write_tar(path: Path, samples: list[_Entry], spill: _Spill,
               shard_index: int) -> tuple[ShardInfo, list[dict[str, Any]]]:
    tmp = path.with_name(f".{path.name}.tmp")
    rows = []
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                               format=tarfile.USTAR_FORMAT) as tar:
        for key, refs, meta in samples:
            start = tar.offset
            for name, data in spill.read(refs):
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            rows.append({
                "key": key, "shard": path.name, "shard_index": shard_index,
                "offset": start, "size": tar.offset - start,
                "members": [name for name, _, _ in refs], **meta,
            })
    info = ShardInfo(path.name, len(samples), tmp.stat().st_size, _sha256_file(tmp))
    tmp.replace(path)
    return info, rows


def _spill_and_write(samples: Iterable[dict[str, Any]], spill: _Spill, out: Path,
                     prefix: str, max_shard_bytes: int, seed: int
                     ) -> tuple[list[ShardInfo], list[dict[str, Any]], int]:
    """Check and spill every sample, shuffle the keys, write the shards: (shards, manifest
    rows, shard count)."""
    prepared: dict[str, _Entry] = {}
    for sample in samples:
        key, members, meta = _prepare(sample)
        if key in prepared:
            raise ShardFormatError(f"duplicate sample key {key}")
        prepared[key] = (key, spill.add(members), meta)
    order = sorted(prepared)
    random.Random(seed).shuffle(order)

    groups: list[list[_Entry]] = []
    size = 0
    for key in order:
        entry = prepared[key]
        need = sum(_entry_bytes(length) for _, _, length in entry[1])
        if not groups or (groups[-1] and _file_bytes(size + need) > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += need

    shards: list[ShardInfo] = []
    rows: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        info, shard_rows = _write_tar(out / f"{prefix}-{i:06d}.tar", group, spill, i)
        shards.append(info)
        rows += shard_rows
    return shards, rows, len(groups)


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str | Path, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, seed: int = 0,
                 prefix: str = "shard") -> ShardSetSummary:
    """Write samples into deterministic tar shards plus `index.json` and `manifest.parquet`.

    All samples are checked before anything is written (ShardFormatError on the first
    bad one; a duplicate key is an error). Shards `{prefix}-NNNNNN.tar` beyond the new
    count that an earlier write left in `out_dir` are removed.
    """
    if not _PREFIX.match(prefix):
        raise ValueError(f"prefix must match {_PREFIX.pattern}, got {prefix!r}")
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".weft-shard-spill-") as scratch:
            spill = _Spill(scratch)
            shards, rows, n_groups = _spill_and_write(samples, spill, out, prefix,
                                                      max_shard_bytes, seed)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a set that failed its checks leaves no empty directory behind
        raise

    index = {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": prefix,
        "shardlist": [{"url": s.name, "nsamples": s.nsamples, "filesize": s.nbytes,
                       "sha256": s.sha256} for s in shards],
        "weft": {"format_version": SHARD_FORMAT_VERSION, "seed": seed,
                 "max_shard_bytes": max_shard_bytes, "n_samples": len(rows)},
    }
    index_path = out / INDEX_NAME
    write_atomic(index_path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    manifest_path = out / MANIFEST_NAME
    rows.sort(key=lambda r: (r["shard_index"], r["offset"]))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(manifest_path, sink.getvalue().to_pybytes())
    # only now, with the new index in place, do shards beyond it go
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
    for stale in out.iterdir():
        m = pattern.match(stale.name)
        if m and int(m.group(1)) >= n_groups:
            stale.unlink()
    return ShardSetSummary(str(out), shards, len(rows), str(index_path), str(manifest_path),
                           seed, max_shard_bytes)


# ---- verifying ---------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    shard_dir: str
    n_shards: int = 0
    n_samples: int = 0
    n_images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _decode_image(data: bytes, name: str) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "").lower()
        image.load()
    ext = name.rsplit(".", 1)[1]
    if {"jpeg": "jpg"}.get(fmt, fmt) != ext:
        raise ValueError(f"{name} holds a {fmt or 'unknown'} image")


def _check_sample(key: str, members: dict[str, bytes], report: VerifyReport) -> str | None:
    """Problems go to the report; returns the json sha256 when the record parsed."""
    where = f"sample {key}"
    try:
        check_key(key)
        for name in members:
            safe_member_name(name, key)
        raw = members.get(f"{key}.json")
        if raw is None:
            raise ShardFormatError("no json member")
        record = json.loads(raw.decode("utf-8"))
        if record.get("key") != key:
            raise ShardFormatError(f"json key {record.get('key')!r} is not the member key")
        images = {n for n in members if not n.endswith(".json")}
        validate_record(record, images)
    except (ShardFormatError, ValueError, AttributeError, TypeError) as exc:
        report.problems.append(f"{where}: {exc}")
        return None
    for name in sorted(images, key=_member_sort_key):
        try:
            _decode_image(members[name], name)
            report.n_images += 1
        except Exception as exc:  # any decoder failure is a finding, not a crash
            report.problems.append(f"{where}: image {name} does not decode: {exc}")
    return hashlib.sha256(raw).hexdigest()


def _read_shard(path: Path, report: VerifyReport) -> dict[str, str | None]:
    """key -> json sha256 for every sample of one shard (problems go to the report)."""
    found: dict[str, str | None] = {}
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> None:
        if current is None:
            return
        if current in found:
            report.problems.append(f"{path.name}: key {current} appears in two groups")
        found[current] = _check_sample(current, members, report)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    report.problems.append(f"{path.name}: {info.name!r} is not a regular file")
                    continue
                key = info.name.partition(".")[0]
                if key != current:
                    flush()
                    current, members = key, {}
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"{info.name} is truncated")
                if info.name in members:
                    report.problems.append(f"{path.name}: member {info.name} appears twice")
                members[info.name] = data
            end = tar.offset
        flush()
        with open(path, "rb") as fh:  # tarfile ends quietly at a cut-off header
            fh.seek(end)
            marker = fh.read(2 * _BLOCK)
        if len(marker) < 2 * _BLOCK or marker.strip(b"\0"):
            report.problems.append(f"{path.name}: truncated (no end-of-archive marker at "
                                   f"byte {end})")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        report.problems.append(f"{path.name}: unreadable tar: {exc}")
    return found


def _load_index(root: Path, report: VerifyReport) -> list[dict[str, Any]]:
    try:
        index = json.loads((root / INDEX_NAME).read_text())
        if index.get("__kind__") != INDEX_KIND or index.get("wids_version") != 1:
            report.problems.append(f"{INDEX_NAME}: not a {INDEX_KIND} index")
        shardlist = index["shardlist"]
        if not isinstance(shardlist, list):
            raise TypeError("shardlist is not a list")
        return shardlist
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        report.problems.append(f"{INDEX_NAME}: unreadable: {exc}")
        return []


def _check_manifest(root: Path, found: dict[str, tuple[str, str | None]],
                    report: VerifyReport) -> None:
    try:
        table = pq.read_table(root / MANIFEST_NAME)
    except (OSError, pa.ArrowException) as exc:
        report.problems.append(f"{MANIFEST_NAME}: unreadable: {exc}")
        return
    version = (table.schema.metadata or {}).get(b"weft.schema_version", b"").decode()
    if version != str(SHARD_FORMAT_VERSION):
        report.problems.append(f"{MANIFEST_NAME}: schema version {version!r}, expected "
                               f"{SHARD_FORMAT_VERSION}")
    missing_cols = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing_cols:
        report.problems.append(f"{MANIFEST_NAME}: missing columns {sorted(missing_cols)}")
        return
    seen = set()
    for row in table.select(["key", "shard", "json_sha256"]).to_pylist():
        key = row["key"]
        if key in seen:
            report.problems.append(f"{MANIFEST_NAME}: key {key} listed twice")
        seen.add(key)
        if key not in found:
            report.problems.append(f"{MANIFEST_NAME}: key {key} is in no readable shard")
            continue
        shard, sha = found[key]
        if shard != row["shard"]:
            report.problems.append(f"{MANIFEST_NAME}: key {key} is in {shard}, "
                                   f"manifest says {row['shard']}")
        elif sha is not None and sha != row["json_sha256"]:
            report.problems.append(f"{MANIFEST_NAME}: key {key} json sha256 differs")
    for key in sorted(found.keys() - seen):
        report.problems.append(f"{MANIFEST_NAME}: key {key} of {found[key][0]} is not listed")


def verify_shards(shard_dir: str | Path) -> VerifyReport:
    """Read a shard set back completely: every shard's sha256 and size against the index,
    every sample's json parsed and validated, every image decoded, sample counts against
    the index, and every sample against the manifest. Never raises for damaged data."""
    root = Path(shard_dir)
    report = VerifyReport(str(root))
    found: dict[str, tuple[str, str | None]] = {}
    for entry in _load_index(root, report):
        try:
            name = safe_shard_name(entry["url"])
            nsamples = int(entry["nsamples"])
        except (KeyError, TypeError, ValueError) as exc:
            report.problems.append(f"{INDEX_NAME}: bad shard entry {entry!r}: {exc}")
            continue
        path = root / name
        report.n_shards += 1
        if not path.is_file():
            report.problems.append(f"{name}: missing")
            continue
        try:
            size = path.stat().st_size
            if entry.get("filesize") is not None and size != entry["filesize"]:
                report.problems.append(f"{name}: {size} bytes, index says {entry['filesize']}")
            if entry.get("sha256") is None:
                report.problems.append(f"{name}: the index has no sha256")
            elif _sha256_file(path) != entry["sha256"]:
                report.problems.append(f"{name}: sha256 differs from the index")
        except OSError as exc:
            report.problems.append(f"{name}: unreadable: {exc}")
            continue
        shard_keys = _read_shard(path, report)
        if len(shard_keys) != nsamples:
            report.problems.append(f"{name}: {len(shard_keys)} samples read, index says "
                                   f"{nsamples}")
        for key, sha in shard_keys.items():
            if key in found:
                report.problems.append(f"{name}: key {key} is also in {found[key][0]}")
            found[key] = (name, sha)
    report.n_samples = len(found)
    _check_manifest(root, found, report)
    return report


def safe_shard_name(name: Any) -> str:
    """The name itself when it is a plain `<prefix>-NNNNNN.tar` (no path): what an index
    may list, so reading an index never opens a file outside its directory."""
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]+-\d{6}\.tar$", name):
        raise ValueError(f"shard url must be a plain shard file name, got {name!r}")
    return name


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES", "IMAGE_EXTS", "INDEX_NAME", "MANIFEST_NAME", "MIXTURE_FILE",
    "ShardInfo", "ShardSetSummary", "VerifyReport",
    "record_bytes", "safe_shard_name", "verify_shards", "write_shards",
]
