"""The packed batch: the one structure the loader hands the model (and inference builds).

Several documents (samples) are packed into one flat token sequence. Each token has
a kind, a document, a split and a RoPE position; images are runs of tokens of one
split. The attention rule that follows from these fields (see `model/masks.py`):

    token i may attend to token j  iff  same document and
        (split[j] < split[i] and j is not a noised latent)      causal across splits
        or (split[j] == split[i] and (full[i] or j <= i))        full inside an image
    plus every token attends to itself (so padding rows are never empty).

Routing is by kind: VAE latent tokens (clean or noised) go to the generation expert,
everything else (text, special markers, ViT tokens, padding) to the understanding one.

`PackBuilder` appends documents item by item and computes positions, splits and
indices; `PackedBatch.validate()` checks every invariant the model relies on.

Every token of an image shares one RoPE position (BAGEL). A model with spatial RoPE
(`MoTConfig.spatial_rope_pairs`) also rotates some pairs by each image token's place in
its image; `PackedBatch.spatial_coords()` derives those from the grids, so nothing else
in the pack changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from enum import IntEnum

import torch

from weft.model.positions import grid_list

IGNORE_INDEX = -100


class TokenKind(IntEnum):
    PAD = 0
    TEXT = 1
    VIT = 2
    VAE_CLEAN = 3
    VAE_NOISED = 4


class PackError(ValueError):
    """A packed batch that breaks the contract between loader and model."""


IMAGE_AXIS_UNITS = 8.0  # an image spans this many units along each axis in spatial RoPE


@functools.lru_cache(maxsize=256)
def _grid_coords(rows: int, cols: int) -> torch.Tensor:
    r = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows * IMAGE_AXIS_UNITS
    c = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols * IMAGE_AXIS_UNITS
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)


def image_token_coords(grids: torch.Tensor | list[tuple[int, int]]) -> torch.Tensor:
    """[sum(rows * cols), 2] row-major (row, col) of each token of each grid, as the
    token centre's fraction of its image times IMAGE_AXIS_UNITS: a ViT patch and a VAE
    latent over the same pixels get the same coordinates whatever their grids."""
    parts = [_grid_coords(rows, cols) for rows, cols in grid_list(grids)]
    return torch.cat(parts) if parts else torch.zeros(0, 2)


@dataclass
class PackedBatch:
    """One packed sequence of `length` tokens (`num_tokens` real ones, then padding).

    Per token (shape [length]): input_ids, kind, doc_ids, split_ids, full_attention,
    position_ids, labels (next-token targets, IGNORE_INDEX where no CE loss).
    ViT: vit_pixels [n_vit_tokens, 3*p*p] (patches of every image in order),
    vit_grids [n_vit_images, 2] (patch rows, cols), vit_index [n_vit_tokens] (positions
    in the sequence). VAE: vae_images (one [3, H, W] tensor in [-1, 1] per image),
    vae_grids [n_vae_images, 2] (latent-patch rows, cols), vae_index [n_vae_tokens],
    vae_token_image [n_vae_tokens] (which image a token belongs to), vae_noised,
    vae_loss [n_vae_images] (bool), vae_timesteps [n_vae_images] (filled by the
    model's flow sampler when None; 0 for clean images).
    """

    input_ids: torch.Tensor
    kind: torch.Tensor
    doc_ids: torch.Tensor
    split_ids: torch.Tensor
    full_attention: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    num_tokens: int
    vit_pixels: torch.Tensor
    vit_grids: torch.Tensor
    vit_index: torch.Tensor
    vae_images: list[torch.Tensor]
    vae_grids: torch.Tensor
    vae_index: torch.Tensor
    vae_token_image: torch.Tensor
    vae_noised: torch.Tensor
    vae_loss: torch.Tensor
    vae_timesteps: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def gen_index(self) -> torch.Tensor:
        """Positions routed to the generation expert: every VAE latent token."""
        return torch.nonzero((self.kind == TokenKind.VAE_CLEAN) |
                             (self.kind == TokenKind.VAE_NOISED)).flatten()

    @property
    def und_index(self) -> torch.Tensor:
        """Positions routed to the understanding expert: all the rest."""
        return torch.nonzero((self.kind != TokenKind.VAE_CLEAN) &
                             (self.kind != TokenKind.VAE_NOISED)).flatten()

    def spatial_coords(self) -> torch.Tensor:
        """[length, 2] (row, col) of every image token in its image (text, padding: 0),
        the image axes of spatial RoPE (`image_token_coords`)."""
        out = torch.zeros(self.length, 2, device=self.kind.device)
        for index, grids in ((self.vit_index, self.vit_grids), (self.vae_index, self.vae_grids)):
            if len(index):
                out[index] = image_token_coords(grids).to(out.device)
        return out

    def token_counts(self) -> dict[str, int]:
        """Tokens per kind (what a pack logs)."""
        return {k.name.lower(): int((self.kind == k).sum()) for k in TokenKind}

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif isinstance(value, list):
                value = [v.to(device) for v in value]
            moved[f.name] = value
        return PackedBatch(**moved)

    def validate(self) -> PackedBatch:
        """Raise PackError unless every invariant holds; returns self."""
        n = self.length
        for name in ("kind", "doc_ids", "split_ids", "full_attention", "position_ids",
                     "labels"):
            if getattr(self, name).shape != (n,):
                raise PackError(f"{name} has shape {tuple(getattr(self, name).shape)}, "
                                f"expected ({n},)")
        if not 0 < self.num_tokens <= n:
            raise PackError(f"num_tokens {self.num_tokens} outside (0, {n}]")
        pad = self.kind == TokenKind.PAD
        if bool(pad[: self.num_tokens].any()) or not bool(pad[self.num_tokens:].all()):
            raise PackError("padding must be exactly the tokens after num_tokens")
        if bool((self.labels[pad] != IGNORE_INDEX).any()):
            raise PackError("padding tokens carry labels")
        docs = self.doc_ids[: self.num_tokens]
        if bool((docs[1:] < docs[:-1]).any()):
            raise PackError("documents must be contiguous and in order")
        splits = self.split_ids[: self.num_tokens]
        if bool((splits[1:] < splits[:-1]).any()):
            raise PackError("splits must be contiguous and in order")
        vit = torch.nonzero(self.kind == TokenKind.VIT).flatten()
        if not torch.equal(vit, self.vit_index):
            raise PackError("vit_index does not list exactly the ViT tokens in order")
        vit_grid_tokens = int(self.vit_grids.prod(dim=1).sum()) if len(self.vit_grids) else 0
        if vit_grid_tokens != len(self.vit_index):
            raise PackError("ViT grids do not add up to the ViT tokens")
        if self.vit_pixels.shape[0] != len(self.vit_index):
            raise PackError("one row of vit_pixels per ViT token is required")
        if not torch.equal(self.gen_index, self.vae_index):
            raise PackError("vae_index does not list exactly the VAE tokens in order")
        n_img = len(self.vae_images)
        for name in ("vae_grids", "vae_noised", "vae_loss"):
            if getattr(self, name).shape[0] != n_img:
                raise PackError(f"{name} needs one entry per VAE image ({n_img})")
        if self.vae_token_image.shape != self.vae_index.shape:
            raise PackError("vae_token_image needs one entry per VAE token")
        counts = torch.bincount(self.vae_token_image, minlength=n_img) if n_img else \
            torch.zeros(0, dtype=torch.long)
        if n_img and not torch.equal(counts, self.vae_grids.prod(dim=1)):
            raise PackError("VAE grids do not match the tokens of each image")
        if bool((self.vae_loss & ~self.vae_noised).any()):
            raise PackError("an MSE loss needs a noised image")
        if self.vae_timesteps is not None and self.vae_timesteps.shape != (n_img,):
            raise PackError("vae_timesteps needs one value per VAE image")
        noised_tokens = self.kind == TokenKind.VAE_NOISED
        if n_img and not torch.equal(noised_tokens[self.vae_index],
                                     self.vae_noised[self.vae_token_image]):
            raise PackError("token kinds disagree with vae_noised")
        return self


@dataclass
class _Doc:
    start_split: int
    position: int = 0
    last_image_position: int | None = None


@dataclass
class PackBuilder:
    """Append documents item by item; `build()` returns a validated PackedBatch.

    vit_patch: pixels per ViT patch side; vae_stride: pixels per latent-patch side
    (VAE downsampling x latent patch size, 8 x 2 for a FLUX-style VAE).
    """

    vit_patch: int = 16
    vae_stride: int = 16
    _ids: list[int] = field(default_factory=list)
    _kind: list[int] = field(default_factory=list)
    _doc: list[int] = field(default_factory=list)
    _split: list[int] = field(default_factory=list)
    _full: list[bool] = field(default_factory=list)
    _pos: list[int] = field(default_factory=list)
    _labels: list[int] = field(default_factory=list)
    _vit_pixels: list[torch.Tensor] = field(default_factory=list)
    _vit_grids: list[tuple[int, int]] = field(default_factory=list)
    _vae_images: list[torch.Tensor] = field(default_factory=list)
    _vae_grids: list[tuple[int, int]] = field(default_factory=list)
    _vae_token_image: list[int] = field(default_factory=list)
    _vae_noised: list[bool] = field(default_factory=list)
    _vae_loss: list[bool] = field(default_factory=list)
    _vae_t: list[float | None] = field(default_factory=list)
    _n_docs: int = 0
    _n_splits: int = 0
    _current: _Doc | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def new_document(self) -> PackBuilder:
        self._n_docs += 1
        self._current = _Doc(start_split=self._n_splits)
        return self

    def _doc_state(self) -> _Doc:
        if self._current is None:
            self.new_document()
        assert self._current is not None
        return self._current

    def _append(self, n: int, kind: TokenKind, full: bool, positions: list[int],
                ids: list[int] | None = None, labels: list[int] | None = None) -> None:
        split = self._n_splits
        self._n_splits += 1
        self._ids += ids if ids is not None else [0] * n
        self._kind += [int(kind)] * n
        self._doc += [self._n_docs - 1] * n
        self._split += [split] * n
        self._full += [full] * n
        self._pos += positions
        self._labels += labels if labels is not None else [IGNORE_INDEX] * n

    def add_text(self, ids: list[int], loss: bool = False) -> PackBuilder:
        """A causal text split; with loss, every token of it is a target: each predicts the
        next, and a text token right before it in the document predicts its first."""
        if not ids:
            raise PackError("a text item needs at least one token")
        doc = self._doc_state()
        labels = [*ids[1:], IGNORE_INDEX] if loss else [IGNORE_INDEX] * len(ids)
        if loss and self._kind and self._kind[-1] == TokenKind.TEXT and \
                self._doc[-1] == self._n_docs - 1:
            # the text just before (a question, a prompt) predicts this item's first token:
            # without it, a one-token answer would never be a target
            self._labels[-1] = ids[0]
        positions = list(range(doc.position, doc.position + len(ids)))
        doc.position += len(ids)
        self._append(len(ids), TokenKind.TEXT, False, positions, list(ids), labels)
        return self

    def _image_position(self, same_as_previous_image: bool) -> int:
        doc = self._doc_state()
        if same_as_previous_image:
            if doc.last_image_position is None:
                raise PackError("no previous image in this document to share a position with")
            return doc.last_image_position
        position = doc.position
        doc.position += 1
        doc.last_image_position = position
        return position

    def add_vit_image(self, patches: torch.Tensor, grid: tuple[int, int],
                      same_position_as_previous_image: bool = False) -> PackBuilder:
        """An image for understanding: one token per ViT patch, full attention inside."""
        rows, cols = grid
        if patches.shape[0] != rows * cols:
            raise PackError(f"{patches.shape[0]} patches for a {rows}x{cols} grid")
        position = self._image_position(same_position_as_previous_image)
        self._vit_pixels.append(patches)
        self._vit_grids.append((rows, cols))
        self._append(rows * cols, TokenKind.VIT, True, [position] * (rows * cols))
        return self

    def add_vae_image(self, image: torch.Tensor, noised: bool, loss: bool | None = None,
                      timestep: float | None = None,
                      same_position_as_previous_image: bool = False) -> PackBuilder:
        """An image as VAE latent tokens: noised (a generation target) or clean (a condition).

        image: [3, H, W] in [-1, 1], H and W multiples of vae_stride.
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise PackError(f"a VAE image must be [3, H, W], got {tuple(image.shape)}")
        height, width = image.shape[1:]
        if height % self.vae_stride or width % self.vae_stride:
            raise PackError(f"image {height}x{width} is not a multiple of {self.vae_stride}")
        rows, cols = height // self.vae_stride, width // self.vae_stride
        loss = noised if loss is None else loss
        position = self._image_position(same_position_as_previous_image)
        index = len(self._vae_images)
        self._vae_images.append(image)
        self._vae_grids.append((rows, cols))
        self._vae_noised.append(noised)
        self._vae_loss.append(loss)
        self._vae_t.append(0.0 if not noised else timestep)
        self._vae_token_image += [index] * (rows * cols)
        kind = TokenKind.VAE_NOISED if noised else TokenKind.VAE_CLEAN
        self._append(rows * cols, kind, True, [position] * (rows * cols))
        return self

    def build(self, pad_to: int | None = None) -> PackedBatch:
        """The packed batch, padded to `pad_to` tokens (static shapes for compiled attention)."""
        n = len(self._ids)
        if n == 0:
            raise PackError("an empty pack")
        length = pad_to if pad_to is not None else n
        if length < n:
            raise PackError(f"{n} tokens do not fit in pad_to={length}")
        pad = length - n

        def tensor(values: list, pad_value, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values + [pad_value] * pad, dtype=dtype)

        kind = tensor(self._kind, int(TokenKind.PAD), torch.long)
        dim = 3 * self.vit_patch * self.vit_patch
        has_t = self._vae_t and all(t is not None for t in self._vae_t)
        batch = PackedBatch(
            input_ids=tensor(self._ids, 0, torch.long),
            kind=kind,
            doc_ids=tensor(self._doc, -1, torch.long),
            split_ids=tensor(self._split, -1, torch.long),
            full_attention=tensor(self._full, False, torch.bool),
            position_ids=tensor(self._pos, 0, torch.long),
            labels=tensor(self._labels, IGNORE_INDEX, torch.long),
            num_tokens=n,
            vit_pixels=torch.cat(self._vit_pixels) if self._vit_pixels else
            torch.zeros(0, dim),
            vit_grids=torch.tensor(self._vit_grids, dtype=torch.long).reshape(-1, 2),
            vit_index=torch.nonzero(kind == TokenKind.VIT).flatten(),
            vae_images=list(self._vae_images),
            vae_grids=torch.tensor(self._vae_grids, dtype=torch.long).reshape(-1, 2),
            vae_index=torch.nonzero((kind == TokenKind.VAE_CLEAN) |
                                    (kind == TokenKind.VAE_NOISED)).flatten(),
            vae_token_image=torch.tensor(self._vae_token_image, dtype=torch.long),
            vae_noised=torch.tensor(self._vae_noised, dtype=torch.bool),
            vae_loss=torch.tensor(self._vae_loss, dtype=torch.bool),
            vae_timesteps=torch.tensor(self._vae_t, dtype=torch.float32) if has_t else None,
        )
        return batch.validate()
