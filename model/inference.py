"""Interleaved inference over a batch of contexts: text in and out, images in and out.

An `Interleaver` holds B independent contexts over one MoTModel and LatentCodec; every
method takes and returns lists with one entry per context.

    append_text / append_image   prefill into the KV cache (text causal; an image as
                                 clean VAE latents then ViT tokens, one RoPE position,
                                 full attention inside, visible to all that follows)
    decode_text                  KV-cached autoregressive decoding (greedy or sampled)
    generate_latents             Euler sampling of noised latents against the cache, with
                                 two-scale CFG (`model/sampler.py`) and, given a guide
                                 Interleaver over an earlier model, autoguidance
    generate_image               the same, decoded to pixels and written back as a clean
                                 image
    edit / think                 the two recipes built from these

Classifier-free guidance needs the velocity under weaker contexts, so each logical
context (`InferenceContext`) keeps three KV caches ("tracks") side by side:

    full          everything appended
    text_uncond   everything but the text conditions (images kept)
    uncond        everything but the text and image conditions

Whether an item is a condition is the `condition` flag of the append (default True):
a condition is left out of the tracks that drop its kind; a non-condition item (a
system prompt, say) goes into all three. Decoded text counts as a text condition by
default (thinking conditions the image it precedes), and a generated image written
back as an image condition. Tracks with identical contents share one cache object and
are forked only when an item goes to some of them and not others, so text-only use
never pays for the CFG tracks and text-to-image costs two forwards per guided step,
not three. Each track keeps its own RoPE positions: a dropped item takes no positions.

A generated image takes one RoPE position: its noised latents sit at the next position
of each track (never cached) and the clean image written back afterwards takes that
same position, as a noised image and its clean copy share one in a training pack.
The written-back latents are the sampled ones (not a VAE round trip of the decoded
pixels); the ViT tokens come from the decoded pixels.

Images are [3, H, W] float in [-1, 1] (what `LatentCodec.decode` returns), H and W
multiples of the codec's stride (16 for a FLUX-style VAE with 2x2 latent patches).
Call `model.eval()` first; every method runs without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from weft.model.flow import euler_timesteps
from weft.model.kv_cache import Job, KVCache, cached_forward
from weft.model.mot import MoTModel
from weft.model.packed import TokenKind
from weft.model.sampler import Guidance, RenormMode, euler_sample
from weft.model.vae import LatentCodec
from weft.model.vision import prepare_vit_image

Track = Literal["full", "text_uncond", "uncond"]
TRACKS: tuple[Track, ...] = ("full", "text_uncond", "uncond")
Condition = Literal["text", "image"] | None
Generators = torch.Generator | Sequence[torch.Generator | None] | None


@dataclass(frozen=True)
class _Item:
    """Tokens to append to one context: input embeddings and layout."""

    hidden: torch.Tensor  # [n, hidden]
    # (kind, token grid) per part of an image; None: one text run
    image_parts: tuple[tuple[TokenKind, tuple[int, int]], ...] | None = None


@dataclass
class InferenceContext:
    """One logical context: its three tracks (see the module doc) and, when the last
    item was text, the final hidden state of its last token (what decoding reads)."""

    tracks: dict[Track, KVCache]
    last_text_hidden: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, num_layers: int) -> InferenceContext:
        shared = KVCache(num_layers)
        return cls({name: shared for name in TRACKS})

    @staticmethod
    def receivers(condition: Condition) -> tuple[Track, ...]:
        """The tracks that keep an item: a text condition only `full`, an image
        condition `full` and `text_uncond`, anything else all three."""
        if condition == "text":
            return ("full",)
        if condition == "image":
            return ("full", "text_uncond")
        return TRACKS

    def distinct(self, names: Sequence[Track]) -> list[KVCache]:
        """The distinct cache objects behind these tracks, in order."""
        out: list[KVCache] = []
        for name in names:
            if not any(cache is self.tracks[name] for cache in out):
                out.append(self.tracks[name])
        return out

    def caches_to_grow(self, names: Sequence[Track]) -> list[KVCache]:
        """The distinct caches an item for `names` goes into; a cache shared with a
        track outside `names` is forked first, so that track stays as it was."""
        for cache in self.distinct(names):
            holders = [n for n in TRACKS if self.tracks[n] is cache]
            if any(n not in names for n in holders):
                fork = cache.fork()
                for n in holders:
                    if n in names:
                        self.tracks[n] = fork
        return self.distinct(names)


class Interleaver:
    """B contexts of interleaved text and images over one model (see the module doc).

    tokenizer: str -> token ids, needed only when `append_text` gets strings.
    vit_max_patches: ViT patch budget per image (None: the connector's full grid).
    """

    def __init__(self, model: MoTModel, codec: LatentCodec, batch_size: int = 1,
                 tokenizer: Callable[[str], Sequence[int]] | None = None,
                 vit_max_patches: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if codec.stride != model.config.vae_stride or codec.token_dim != \
                model.config.latent_token_dim:
            raise ValueError(f"codec (stride {codec.stride}, token dim {codec.token_dim}) "
                             f"does not fit the model (stride {model.config.vae_stride}, "
                             f"token dim {model.config.latent_token_dim})")
        self.model, self.codec, self.batch_size = model, codec, batch_size
        self.tokenizer = tokenizer
        self.vit_max_patches = vit_max_patches or model.config.vit_max_grid ** 2
        self.contexts: list[InferenceContext] = []
        self.reset()

    def reset(self) -> None:
        """Empty every context."""
        layers = self.model.config.llm.num_layers
        self.contexts = [InferenceContext.empty(layers) for _ in range(self.batch_size)]

    @property
    def device(self) -> torch.device:
        return self.model.backbone.embed_tokens.weight.device

    def lengths(self, track: Track = "full") -> list[int]:
        """Cached tokens per context in one track."""
        return [len(ctx.tracks[track]) for ctx in self.contexts]

    # ---- appending ---------------------------------------------------------------------
    @torch.no_grad()
    def append_text(self, texts: Sequence[str | Sequence[int]], condition: bool = True
                    ) -> list[torch.Tensor]:
        """Prefill one text per context (a string needs the tokenizer) as a causal split.

        Returns each context's final hidden states of the new tokens [n_i, hidden]
        (logits: `model.backbone.lm_head(h)`).
        """
        self._check_batch(texts)
        items = []
        for text in texts:
            ids = self._ids(text)
            if not ids:
                raise ValueError("cannot append an empty text")
            tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
            items.append(_Item(self.model.backbone.embed_text(tensor)))
        return self._append(items, "text" if condition else None)

    @torch.no_grad()
    def append_image(self, images: Sequence[torch.Tensor], condition: bool = True
                     ) -> list[torch.Tensor]:
        """Prefill one image per context: its clean VAE latents, then its ViT tokens (if the
        model has vision), at one RoPE position (the order the trainer's plans use).
        Returns the final hidden states of the new tokens [n_latent + n_vit, hidden]."""
        self._check_batch(images)
        return self._append_images(images, None, condition)

    def append_vit_image(self, images: Sequence[torch.Tensor], condition: bool = True
                         ) -> list[torch.Tensor]:
        """Prefill one image per context as ViT tokens only: an image that is read, never
        generated (how the trainer lays out VQA and caption images, `plans.understood`).
        images: [3, H, W] in [-1, 1]. Needs a model with vision."""
        self._check_batch(images)
        vit, grids = self._vit_hidden(images)
        if vit is None:
            raise ValueError("append_vit_image needs a model with a vision encoder "
                             "(model.unified.vit_path)")
        dtype = self.model.dtype
        return self._append([_Item(v.to(dtype), ((TokenKind.VIT, g),))
                             for v, g in zip(vit, grids, strict=True)],
                            "image" if condition else None)

    # ---- text out ------------------------------------------------------------------------
    @torch.no_grad()
    def decode_text(self, max_new_tokens: int, eos_id: int | None = None,
                    temperature: float = 0.0, generator: Generators = None,
                    condition: bool = True) -> list[list[int]]:
        """Decode up to max_new_tokens per context (fewer once it emits eos_id, which is
        kept); the tokens are appended to the context. temperature 0: greedy; above 0:
        sampled from softmax(logits / temperature) with `generator` (one, or one per
        context). Each context's last item must be text."""
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError("max_new_tokens and temperature must not be negative")
        for i, ctx in enumerate(self.contexts):
            if ctx.last_text_hidden is None:
                raise ValueError(f"context {i} does not end with text; append a prompt (or "
                                 "a start marker) before decoding")
        generators = self._generators(generator)
        out: list[list[int]] = [[] for _ in self.contexts]
        active = list(range(self.batch_size))
        for _ in range(max_new_tokens):
            if not active:
                break
            last = torch.stack([self.contexts[i].last_text_hidden for i in active])
            logits = self.model.backbone.lm_head(last).float()
            items: list[_Item | None] = [None] * self.batch_size
            for row, i in enumerate(active):
                token = _pick(logits[row], temperature, generators[i])
                out[i].append(token)
                ids = torch.tensor([token], dtype=torch.long, device=self.device)
                items[i] = _Item(self.model.backbone.embed_text(ids))
            self._append(items, "text" if condition else None)
            active = [i for i in active if out[i][-1] != eos_id]
        return out

    # ---- images out ----------------------------------------------------------------------
    @torch.no_grad()
    def generate_image(self, height: int, width: int, steps: int = 50, shift: float = 3.0,
                       cfg_text_scale: float = 4.0, cfg_image_scale: float = 1.5,
                       cfg_interval: tuple[float, float] = (0.4, 1.0),
                       cfg_renorm: RenormMode = "global", generator: Generators = None,
                       append: bool = True, guide: Interleaver | None = None,
                       autoguidance: float = 1.0) -> list[torch.Tensor]:
        """Sample one image per context (`generate_latents`), decode it to pixels and
        (with `append`) write it back into the context as an image condition.

        Returns [3, height, width] in [-1, 1] per context.
        """
        latents = self.generate_latents(height, width, steps, shift, cfg_text_scale,
                                        cfg_image_scale, cfg_interval, cfg_renorm, generator,
                                        guide=guide, autoguidance=autoguidance)
        images = [image.to(self.device) for image in self.codec.decode(latents)]
        if append:
            self._append_images(images, latents, condition=True)
        return images

    @torch.no_grad()
    def generate_latents(self, height: int, width: int, steps: int = 50, shift: float = 3.0,
                         cfg_text_scale: float = 4.0, cfg_image_scale: float = 1.5,
                         cfg_interval: tuple[float, float] = (0.4, 1.0),
                         cfg_renorm: RenormMode = "global", generator: Generators = None,
                         start: Sequence[torch.Tensor] | None = None, start_t: float = 1.0,
                         guide: Interleaver | None = None, autoguidance: float = 1.0
                         ) -> list[torch.Tensor]:
        """Euler-sample normalised latents [C, height/8, width/8] per context from noise
        (drawn with `generator`, one or one per context), guided by two-scale CFG inside
        `cfg_interval` (`model/sampler.py`). The contexts are not changed.

        start: noised latents x_t [C, h, w] per context at t = start_t to continue from
        instead of noise (the schedule's steps above start_t are skipped): how far from
        a known image the model still lands on it tells which noise levels it fails at.
        guide, autoguidance: autoguidance (Karras et al. 2024, "Guiding a Diffusion Model
        with a Bad Version of Itself"): `guide` holds the same contexts over a weaker
        model (an earlier checkpoint of this one) and every step integrates
        v_guide + autoguidance · (v − v_guide), each v with the same CFG; 1 is off.
        """
        if autoguidance < 1.0:
            raise ValueError(f"autoguidance must be >= 1 (1 is off), got {autoguidance}")
        if guide is not None:
            self._check_guide(guide)
        stride = self.codec.stride
        if height <= 0 or width <= 0 or height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} must be positive multiples of "
                             f"{stride}")
        grid = (height // stride, width // stride)
        n = grid[0] * grid[1]
        guidance = Guidance(cfg_text_scale, cfg_image_scale, cfg_interval, cfg_renorm)
        timesteps = euler_timesteps(steps, shift)
        if start is None:
            x = torch.cat([torch.randn((n, self.model.config.latent_token_dim), generator=g,
                                       device=g.device if g is not None else self.device)
                           for g in self._generators(generator)]).to(self.device, torch.float32)
        else:
            self._check_batch(start)
            if not 0.0 < start_t <= 1.0:
                raise ValueError(f"start_t must be in (0, 1], got {start_t}")
            x = torch.cat([self._latent_tokens(latent, grid) for latent in start])
            below = timesteps[timesteps < start_t - 1e-6]
            timesteps = torch.cat([torch.tensor([start_t], dtype=timesteps.dtype), below])

        def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
            v = self._guided_velocity(x_t.split(n), grid, t, guidance)
            if guide is None or autoguidance == 1.0:
                return v
            v_guide = guide._guided_velocity(x_t.split(n), grid, t, guidance)
            return v_guide + autoguidance * (v - v_guide)

        tokens = euler_sample(x, velocity, timesteps).split(n)
        return [self.codec.unpatchify(tok, grid) for tok in tokens]

    @torch.no_grad()
    def velocities(self, latents: Sequence[torch.Tensor], t: float,
                   cfg_text_scale: float = 1.0, cfg_image_scale: float = 1.0,
                   cfg_renorm: RenormMode = "global") -> list[torch.Tensor]:
        """The (guided) velocity [C, h, w] the sampler would integrate at t for noised
        latents x_t [C, h, w], one per context: what a diagnosis compares with ε − x0."""
        self._check_batch(latents)
        grid = self._latent_grid(latents[0])
        guidance = Guidance(cfg_text_scale, cfg_image_scale, (0.0, 1.0), cfg_renorm)
        tokens = [self._latent_tokens(latent, grid) for latent in latents]
        v = self._guided_velocity(tokens, grid, t, guidance)
        return [self.codec.unpatchify(tok, grid) for tok in v.split(len(tokens[0]))]

    def _latent_grid(self, latent: torch.Tensor) -> tuple[int, int]:
        patch = self.codec.patch
        return latent.shape[-2] // patch, latent.shape[-1] // patch

    def _latent_tokens(self, latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[C, h, w] normalised latents -> [n, token_dim] tokens on the model's device."""
        if self._latent_grid(latent) != grid:
            raise ValueError(f"latent {tuple(latent.shape)} does not give a {grid} token grid")
        return self.codec.patchify(latent.to(self.device, torch.float32))

    def _guided_velocity(self, x_t: Sequence[torch.Tensor], grid: tuple[int, int], t: float,
                         guidance: Guidance) -> torch.Tensor:
        """One guided velocity per context at t, concatenated [B * n, token_dim]."""
        model = self.model
        names = TRACKS if guidance.active(t) else ("full",)
        t_now = torch.tensor([t], device=self.device)
        jobs, owners = [], []
        for i, ctx in enumerate(self.contexts):
            one_image = torch.zeros(len(x_t[i]), dtype=torch.long, device=self.device)
            hidden = model.embed_latents(x_t[i], [grid], t_now, one_image)
            for cache in ctx.distinct(names):
                chunk = cache.image_chunk([(TokenKind.VAE_NOISED, grid)])
                jobs.append(Job(cache, chunk, hidden))
                owners.append((i, id(cache)))
        outs = cached_forward(model.backbone, jobs, store=False)
        predicted = {key: model.latent(h).float() for key, h in zip(owners, outs, strict=True)}
        result = []
        for i, ctx in enumerate(self.contexts):
            v = {name: predicted[(i, id(ctx.tracks[name]))] for name in names}
            result.append(guidance(t, v["full"], v.get("text_uncond"), v.get("uncond")))
        return torch.cat(result)

    # ---- recipes -----------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, images: Sequence[torch.Tensor], instructions: Sequence[str | Sequence[int]],
             **generate: Any) -> list[torch.Tensor]:
        """Append each source image and its instruction, then generate with both text and
        image guidance; the output has the source's size unless height/width are given."""
        self._check_batch(images)
        sizes = {tuple(image.shape[1:]) for image in images}
        if ("height" not in generate or "width" not in generate) and len(sizes) != 1:
            raise ValueError(f"source images differ in size {sorted(sizes)}; pass height "
                             "and width")
        height, width = next(iter(sizes))
        generate.setdefault("height", height)
        generate.setdefault("width", width)
        self.append_image(images)
        self.append_text(instructions)
        return self.generate_image(**generate)

    @torch.no_grad()
    def think(self, prompts: Sequence[str | Sequence[int]], height: int, width: int,
              max_think_tokens: int = 256, stop_id: int | None = None,
              temperature: float = 0.0, generator: Generators = None,
              **generate: Any) -> list[tuple[list[int], torch.Tensor]]:
        """Append each prompt, decode reasoning (until stop_id or max_think_tokens), then
        generate an image conditioned on prompt and reasoning: (reasoning ids, image)."""
        self.append_text(prompts)
        thoughts = self.decode_text(max_think_tokens, stop_id, temperature, generator)
        images = self.generate_image(height, width, generator=generator, **generate)
        return list(zip(thoughts, images, strict=True))

    # ---- internals -----------------------------------------------------------------------
    def _append(self, items: Sequence[_Item | None], condition: Condition
                ) -> list[torch.Tensor]:
        """Prefill items (None: leave that context alone) into the tracks that keep them,
        all contexts in one batched forward. Returns the `full` track's hidden states."""
        jobs, owners = [], []
        for i, (ctx, item) in enumerate(zip(self.contexts, items, strict=True)):
            if item is None:
                continue
            for cache in ctx.caches_to_grow(ctx.receivers(condition)):
                chunk = cache.image_chunk(item.image_parts) if item.image_parts else \
                    cache.text_chunk(item.hidden.shape[0])
                jobs.append(Job(cache, chunk, item.hidden))
                owners.append((i, cache is ctx.tracks["full"]))
        outs = cached_forward(self.model.backbone, jobs, store=True)
        full: dict[int, torch.Tensor] = {i: h for (i, is_full), h in
                                         zip(owners, outs, strict=True) if is_full}
        for i, item in enumerate(items):
            if item is not None:
                ctx = self.contexts[i]
                ctx.last_text_hidden = None if item.image_parts else full[i][-1]
        return [full[i] for i in sorted(full)]

    def _append_images(self, images: Sequence[torch.Tensor],
                       latents: Sequence[torch.Tensor] | None, condition: bool
                       ) -> list[torch.Tensor]:
        """Embed images (ViT + clean latents; latents given or VAE-encoded) and prefill."""
        model, stride = self.model, self.codec.stride
        for image in images:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"an image must be [3, H, W], got {tuple(image.shape)}")
            if image.shape[1] % stride or image.shape[2] % stride:
                raise ValueError(f"image {tuple(image.shape[1:])} is not a multiple of the "
                                 f"codec stride {stride}")
        if latents is None:
            latents = self.codec.encode(images)
        dtype = model.dtype
        vit, vit_grids = self._vit_hidden(images)
        clean = torch.zeros(1, device=self.device)  # a condition image is clean: t = 0
        items = []
        for i, latent in enumerate(latents):
            tokens = self.codec.patchify(latent.to(self.device, torch.float32))
            grid = (latent.shape[1] // self.codec.patch, latent.shape[2] // self.codec.patch)
            one_image = torch.zeros(len(tokens), dtype=torch.long, device=self.device)
            hidden = model.embed_latents(tokens, [grid], clean, one_image)
            parts: tuple[tuple[TokenKind, tuple[int, int]], ...] = \
                ((TokenKind.VAE_CLEAN, grid),)
            if vit is not None:  # clean latents, then ViT: the order the trainer's plans use
                hidden = torch.cat([hidden, vit[i].to(dtype)])
                parts = (*parts, (TokenKind.VIT, vit_grids[i]))
            items.append(_Item(hidden, parts))
        return self._append(items, "image" if condition else None)

    def _vit_hidden(self, images: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor] | None, list[tuple[int, int]]]:
        """ViT tokens after the connector [n_vit_i, hidden] per image and their patch
        grids; (None, []) without vision."""
        model = self.model
        if model.vision is None or model.connector is None:
            return None, []
        patches, grids = [], []
        for image in images:
            pixels = ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
            p, grid = prepare_vit_image(pixels, model.vision.patch_size, self.vit_max_patches,
                                        max_side=model.config.vit_max_grid)
            patches.append(p)
            grids.append(grid)
        out = model.embed_vit(torch.cat(patches), grids)
        return list(out.split([r * c for r, c in grids])), grids

    def _ids(self, text: str | Sequence[int]) -> list[int]:
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError("append_text got a string but the Interleaver has no "
                                 "tokenizer; pass token ids or a tokenizer")
            return [int(i) for i in self.tokenizer(text)]
        return [int(i) for i in text]

    def _check_guide(self, guide: Interleaver) -> None:
        """A guide must hold the same contexts: as many, as long in every track."""
        if guide.batch_size != self.batch_size or any(
                guide.lengths(track) != self.lengths(track) for track in TRACKS):
            raise ValueError("the guide's contexts differ from these (append the same items "
                             f"to both): lengths {guide.lengths()} vs {self.lengths()}")
        if guide.model.config.latent_token_dim != self.model.config.latent_token_dim:
            raise ValueError("the guide model's latent tokens differ from this model's")

    def _check_batch(self, values: Sequence[object]) -> None:
        if len(values) != self.batch_size:
            raise ValueError(f"{len(values)} inputs for {self.batch_size} contexts")

    def _generators(self, generator: Generators) -> list[torch.Generator | None]:
        """One generator (or None) per context; a single generator is shared in order."""
        if generator is None or isinstance(generator, torch.Generator):
            return [generator] * self.batch_size
        generators = list(generator)
        self._check_batch(generators)
        return generators


def _pick(logits: torch.Tensor, temperature: float,
          generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or sampled next token from logits [vocab]."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))
