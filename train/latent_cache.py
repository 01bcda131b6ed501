"""Latents of images already seen, kept in memory: the frozen VAE never encodes one twice.

The trainer encodes every VAE image of every pack with the frozen codec. The codec takes
the posterior mean, so an image gives the same latent every time, and a small dataset
read for many epochs (the shapes world: ~15k images, a few MB of latents) pays that
encoder again and again (a sixth of a CPU step there). `LatentCache` keys each image by
a hash of its pixels (computed on the host copy, so no device sync) and encodes only the
misses (an image twice in one pack, as a generated target and its clean copy, once),
least recently used out first once `max_bytes` is reached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch


def image_key(image: torch.Tensor) -> bytes:
    """A 16-byte digest of a host image's shape, dtype and pixels."""
    data = image.detach().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}:{data.dtype}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


class LatentCache:
    """An LRU of latents in front of a deterministic encoder (`LatentCodec.encode`)."""

    def __init__(self, codec: Any, max_bytes: int) -> None:
        if getattr(codec, "sample_posterior", False):
            raise ValueError("a latent cache needs a deterministic codec (posterior mean); "
                             "this one samples the posterior")
        self.codec = codec
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def encode(self, images: Sequence[torch.Tensor],
               host_images: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Latents of `images` (on the codec's device); keys from `host_images` (the same
        images on the CPU) when given, so hashing never copies from an accelerator."""
        keys = [image_key(im) for im in (host_images if host_images is not None
                                         else images)]
        out: list[torch.Tensor | None] = [self._get(k) for k in keys]
        first: dict[bytes, int] = {}  # one encode per distinct missing image
        for i, z in enumerate(out):
            if z is None:
                first.setdefault(keys[i], i)
        self.hits += sum(z is not None for z in out)
        self.misses += len(first)
        if first:
            fresh = dict(zip(first, self.codec.encode([images[i] for i in first.values()]),
                             strict=True))
            for key, latent in fresh.items():
                self._put(key, latent)
            out = [fresh[k] if z is None else z for k, z in zip(keys, out, strict=True)]
        return [z for z in out if z is not None]

    def _get(self, key: bytes) -> torch.Tensor | None:
        latent = self._items.get(key)
        if latent is not None:
            self._items.move_to_end(key)
        return latent

    def _put(self, key: bytes, latent: torch.Tensor) -> None:
        size = latent.numel() * latent.element_size()
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = latent
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def describe(self) -> str:
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        return (f"latent cache: {len(self)} latents, {self.bytes / 2**20:.1f} MiB, "
                f"hit rate {rate:.2f} ({self.hits}/{total})")


__all__ = ["LatentCache", "image_key"]
