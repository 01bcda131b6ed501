"""A small FLUX-interface VAE trained on shapes renders, so the shapes world needs no download.

The model generates in a frozen VAE's latent space (`weft.model.vae.LatentCodec`). A random
VAE decodes to noise, and the real FLUX VAE is large and not on every machine, so the
shapes world trains its own: a diffusers `AutoencoderKL` with FLUX's interface (16 latent
channels, 4 blocks = 8x down) but small widths, on renders drawn on the fly (flat colours
on a plain background are easy to reconstruct). Loss: L1 + MSE on pixels plus a small KL,
which keeps the posterior mean smooth enough for the flow model to predict.

After training, `scaling_factor` and `shift_factor` are set from the posterior means of
fresh renders (shift = mean, scale = 1 / std), so normalised latents have ~zero mean and
unit variance, as FLUX's constants give for natural images. The directory is written with
`save_pretrained` and loads through `LatentCodec.from_pretrained` like any other VAE.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weft.stages.shapes.render import render
from weft.stages.shapes.scene import Scene, SceneConfig, sample_scene

STATS_FILE = "shapes_vae_stats.json"  # training summary written next to the weights


@dataclass
class VaeTrainStats:
    """What a training run did: losses at the start and end, time, normalisation."""

    steps: int
    first_loss: float
    last_loss: float
    first_l1: float
    last_l1: float
    seconds: float
    scaling_factor: float
    shift_factor: float
    history: list[float] = field(default_factory=list)


def make_shapes_vae(image_size: int = 64, widths: tuple[int, ...] = (16, 32, 32, 32)
                    ) -> torch.nn.Module:
    """An untrained FLUX-shaped AutoencoderKL (16 latent channels, 8x down) of small width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=1, norm_num_groups=8,
        latent_channels=16, sample_size=image_size, mid_block_add_attention=False,
        scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False)


def render_scenes(scenes: Sequence[Scene]) -> torch.Tensor:
    """Scenes rendered as [n, 3, H, W] in [-1, 1] (the codec's and SigLIP2's input range)."""
    images = np.stack([render(scene) for scene in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_batch(rng: np.random.Generator, cfg: SceneConfig, n: int) -> torch.Tensor:
    """n random scenes as [n, 3, H, W] in [-1, 1]."""
    return render_scenes([sample_scene(rng, cfg) for _ in range(n)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> (n, H, W, 3) uint8 RGB (what the detector reads)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _loss(vae: torch.nn.Module, x: torch.Tensor, kl_weight: float
          ) -> tuple[torch.Tensor, float]:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - x).abs().mean()
    loss = l1 + ((recon - x) ** 2).mean() + kl_weight * posterior.kl().mean() / x[0].numel()
    return loss, float(l1.detach())


@torch.no_grad()
def latent_stats(vae: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(shift, scale) so that (mean_latent - shift) * scale has zero mean, unit std."""
    z = vae.encode(x).latent_dist.mean
    return float(z.mean()), 1.0 / max(float(z.std()), 1e-6)


def train_shapes_vae(out_dir: str | Path, image_size: int = 64, steps: int = 500,
                     seed: int = 0, batch_size: int = 16, lr: float = 2e-3,
                     kl_weight: float = 1e-3, widths: tuple[int, ...] = (16, 32, 32, 32),
                     scene: SceneConfig | None = None, log_every: int = 0,
                     progress: bool = False) -> Path:
    """Train a shapes VAE and save it to `out_dir` (reused when already complete).

    The scenes follow `scene` (default: the shapes world's defaults at `image_size`).
    Returns `out_dir`, ready for `LatentCodec.from_pretrained`. progress: a tqdm bar.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / STATS_FILE).is_file():
        return out
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = scene or SceneConfig(image_size=image_size)
    vae = make_shapes_vae(cfg.image_size, widths).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    history: list[float] = []
    l1s: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="shapes VAE", unit="step", disable=not progress)
    for step in range(steps):
        loss, l1 = _loss(vae, render_batch(rng, cfg, batch_size), kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        l1s.append(l1)
        bar.update()
        if progress and (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{history[-1]:.4f}", l1=f"{l1:.4f}")
        if log_every and (step + 1) % log_every == 0:
            print(f"vae step {step + 1}/{steps} loss {history[-1]:.4f} l1 {l1:.4f}")
    bar.close()
    vae.eval()
    shift, scale = latent_stats(vae, render_batch(rng, cfg, 64))
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out)
    k = max(1, min(10, steps // 10))
    stats = VaeTrainStats(steps, float(np.mean(history[:k])), float(np.mean(history[-k:])),
                          float(np.mean(l1s[:k])), float(np.mean(l1s[-k:])),
                          time.perf_counter() - start, scale, shift, history)
    (out / STATS_FILE).write_text(json.dumps(asdict(stats)))
    return out


def load_stats(vae_dir: str | Path) -> VaeTrainStats:
    """The training summary saved with a shapes VAE."""
    return VaeTrainStats(**json.loads((Path(vae_dir) / STATS_FILE).read_text()))


def reconstruction_report(vae_dir: str | Path, n: int = 64, seed: int = 1,
                          pos_tol: float | None = None, scene: SceneConfig | None = None,
                          latent_noise: float = 0.0) -> dict[str, float]:
    """How well a saved VAE round-trips fresh scenes of `scene` (default: the shapes
    world's defaults at the VAE's size) through `LatentCodec`.

    l1: mean absolute pixel error in [-1, 1] units; detect: share of scenes the detector
    reads back from the reconstruction (same objects, centres within pos_tol, default
    an eighth of the side, as edits are scored); latent_std: std of normalised latents.
    The detector share bounds every generation score: a sample is decoded by this VAE.
    latent_noise: std of Gaussian noise added to the (unit-variance) latents before
    decoding, i.e. how far off a generated latent may be and still decode right.
    """
    from weft.model.vae import LatentCodec
    from weft.stages.shapes.detect import detect, match_scene
    from weft.stages.shapes.geneval import default_pos_tol

    codec = LatentCodec.from_pretrained(vae_dir)
    size = int(codec.vae.config.sample_size)
    cfg = scene or SceneConfig(image_size=size)
    if cfg.image_size != size:
        raise ValueError(f"scene image_size {cfg.image_size} != the VAE's sample_size {size}")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, cfg) for _ in range(n)]
    x = render_scenes(scenes)
    latents = codec.encode(list(x))
    z = torch.stack(latents)
    if latent_noise:
        gen = torch.Generator().manual_seed(seed)
        latents = [lat + latent_noise * torch.randn(lat.shape, generator=gen) for lat in latents]
    recon = torch.stack(codec.decode(latents))
    tol = default_pos_tol(size) if pos_tol is None else pos_tol
    world = tuple(cfg.shapes)  # read as the evaluation reads: in the world's shapes
    hits = [match_scene(s, detect(im, shapes=world), tol)
            for s, im in zip(scenes, to_uint8(recon), strict=True)]
    return {"l1": float((recon - x).abs().mean()), "detect": float(np.mean(hits)),
            "latent_mean": float(z.mean()), "latent_std": float(z.std())}


__all__ = ["STATS_FILE", "VaeTrainStats", "latent_stats", "load_stats", "make_shapes_vae",
           "reconstruction_report", "render_batch", "render_scenes", "to_uint8",
           "train_shapes_vae"]
