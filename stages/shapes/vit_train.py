"""A SigLIP2 vision tower pretrained on shapes renders, as BAGEL starts from a pretrained one.

BAGEL's understanding path reads images through a *pretrained* SigLIP2; a random-init
tower trained only through the LLM's answer tokens learns colour but not shape in a CPU
budget (shape lives in a few edge patches, and the answer loss reaches them weakly). So
the shapes world pretrains its tiny tower on renders drawn on the fly, with a dense
objective: every patch token predicts what covers its patch, background or one of the
world's (colour, shape) classes. A patch on a triangle's edge can only answer "triangle"
by looking at its neighbours, which is what the LLM later needs to read from one token.
Optionally (`location_weight`) every object patch also regresses its object's centre,
after SigLIP2's location-aware side (LocCa): the features then say where as well as what
(the 2-D position the connector adds is a few percent of a feature's norm). Measured on
the CPU recipe it did not teach "is the red square left of the blue circle?" and cost
other VQA rows, so the recipe leaves it off (README, shapes section).

The head is thrown away; the tower is saved with `save_pretrained` and loads through
`VisionEncoder.from_pretrained` like real SigLIP2 weights, and keeps training with the
model. Held-out patch and object accuracy are written next to the weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weft.model.tiny_parts import tiny_siglip2
from weft.model.vision import VisionEncoder, patchify_image, quiet_transformers
from weft.schemas.run_dir import build_dir_once
from weft.stages.shapes.render import object_mask
from weft.stages.shapes.scene import Scene, SceneConfig, sample_scene
from weft.stages.shapes.vae_train import render_scenes

STATS_FILE = "shapes_vit_stats.json"  # training summary written next to the weights
MIN_COVER = 0.25  # a patch is an object's when the object covers at least this share of it


@dataclass
class VitTrainStats:
    """What a pretraining run did: losses, held-out accuracy, time."""

    steps: int
    first_loss: float
    last_loss: float
    patch_accuracy: float   # held-out patches labelled right (background included)
    object_accuracy: float  # held-out object patches labelled right (colour and shape)
    shape_accuracy: float   # held-out object patches given the right shape
    seconds: float
    centre_error_px: float = float("nan")  # held-out object patches: distance to its centre
    classes: list[str] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


def patch_classes(cfg: SceneConfig) -> list[str]:
    """Class names: 'background', then 'colour shape' for every colour and shape."""
    return ["background"] + [f"{c} {s}" for c in cfg.colours for s in cfg.shapes]


def patch_owners(scene: Scene, patch: int) -> np.ndarray:
    """Which object covers each patch, row-major [rows * cols]: 0 for background, k for
    scene.objects[k - 1] (objects never overlap)."""
    size = scene.image_size
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the patch {patch}")
    grid = size // patch
    cover = np.zeros((len(scene.objects) + 1, grid, grid))
    cover[0] = MIN_COVER * patch * patch  # background wins unless an object covers enough
    for k, obj in enumerate(scene.objects, start=1):
        cover[k] = object_mask(obj, size).reshape(grid, patch, grid, patch).sum(axis=(1, 3))
    return cover.argmax(axis=0).reshape(-1)


def _object_classes(scene: Scene, cfg: SceneConfig) -> np.ndarray:
    """[1 + objects]: background's class 0, then each object's index into `patch_classes`."""
    return np.asarray([0] + [1 + cfg.colours.index(o.colour) * len(cfg.shapes)
                             + cfg.shapes.index(o.shape) for o in scene.objects],
                      dtype=np.int64)


def _object_centres(scene: Scene) -> np.ndarray:
    """[1 + objects, 2]: (0, 0) for background, then each object's centre (x, y) as
    fractions of the side."""
    return np.asarray([(0.0, 0.0)] + [(o.x / scene.image_size, o.y / scene.image_size)
                                      for o in scene.objects], dtype=np.float32)


def patch_labels(scene: Scene, cfg: SceneConfig, patch: int) -> np.ndarray:
    """The class of each patch, row-major [rows * cols] (index into `patch_classes`)."""
    return _object_classes(scene, cfg)[patch_owners(scene, patch)]


def patch_centres(scene: Scene, patch: int) -> np.ndarray:
    """The centre (x, y) of the object covering each patch, as fractions of the side,
    [rows * cols, 2]; background patches get (0, 0) (they are not scored)."""
    return _object_centres(scene)[patch_owners(scene, patch)]


def scene_batch(rng: np.random.Generator, cfg: SceneConfig, n: int, patch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random scenes as SigLIP2 patches [n, rows * cols, 3 p p], labels [n, rows * cols]
    and object centres [n, rows * cols, 2]."""
    scenes = [sample_scene(rng, cfg) for _ in range(n)]
    pixels = torch.stack([patchify_image(image, patch)[0] for image in render_scenes(scenes)])
    owners = [patch_owners(scene, patch) for scene in scenes]  # object masks: once a scene
    labels = np.stack([_object_classes(s, cfg)[o] for s, o in zip(scenes, owners, strict=True)])
    centres = np.stack([_object_centres(s)[o] for s, o in zip(scenes, owners, strict=True)])
    return pixels, torch.from_numpy(labels), torch.from_numpy(centres)


def _features(vit: VisionEncoder, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """[n, tokens, 3 p p] -> [n, tokens, hidden], through the model's own encoder path."""
    n, tokens = pixels.shape[:2]
    return vit(pixels.flatten(0, 1), [(grid, grid)] * n).reshape(n, tokens, -1)


def _loss(out: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, n_classes: int,
          location_weight: float) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(out[..., :n_classes].flatten(0, 1),
                                             labels.flatten())
    on = labels > 0
    if location_weight and bool(on.any()):
        where = out[..., n_classes:]
        loss = loss + location_weight * ((where[on] - centres[on]) ** 2).sum(-1).mean()
    return loss


@torch.no_grad()
def _accuracy(vit: VisionEncoder, head: torch.nn.Module, pixels: torch.Tensor,
              labels: torch.Tensor, centres: torch.Tensor, grid: int, n_classes: int,
              n_shapes: int, size: int) -> tuple[float, float, float, float]:
    """Held-out (patch, object, shape accuracy, centre error in px: nan when untrained)."""
    device = next(vit.parameters()).device
    out = head(_features(vit, pixels.to(device), grid)).cpu()
    pred = out[..., :n_classes].argmax(-1)
    on = labels > 0
    same_shape = (pred - 1) % n_shapes == (labels - 1) % n_shapes
    error = float("nan")
    if out.shape[-1] > n_classes:
        error = float((out[..., n_classes:][on] - centres[on]).norm(dim=-1).mean()) * size
    return (float((pred == labels).float().mean()), float((pred == labels)[on].float().mean()),
            float((same_shape & (pred > 0))[on].float().mean()), error)


def train_shapes_vit(out_dir: str | Path, scene: SceneConfig, hidden: int = 64,
                     layers: int = 2, patch: int = 4, steps: int = 600, batch_size: int = 32,
                     lr: float = 2e-3, location_weight: float = 0.0, seed: int = 0,
                     progress: bool = False, device: str | None = None) -> Path:
    """Pretrain a SigLIP2 tower on `scene` renders and save it to `out_dir` (reused when
    already complete). Returns `out_dir`, ready for `VisionEncoder.from_pretrained`.
    location_weight: of the object-centre loss (squared error in side fractions) beside
    the patch-class cross-entropy; 0 trains classes only. device: where the tower
    trains (None: CUDA when there is one; renders are drawn on the CPU either way)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if scene.image_size % patch:
        raise ValueError(f"image size {scene.image_size} is not a multiple of patch {patch}")

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        grid = scene.image_size // patch
        classes = patch_classes(scene)
        vit = VisionEncoder(tiny_siglip2(hidden, layers, patch)).to(device).train()
        # classes, then the centre's x and y when it is trained
        head = torch.nn.Linear(hidden, len(classes) + (2 if location_weight else 0)).to(device)
        params = [*vit.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        history: list[float] = []
        start = time.perf_counter()
        bar = tqdm(total=steps, desc="shapes ViT", unit="step", disable=not progress)
        for step in range(steps):
            pixels, labels, centres = scene_batch(rng, scene, batch_size, patch)
            out = head(_features(vit, pixels.to(device), grid))
            loss = _loss(out, labels.to(device), centres.to(device), len(classes),
                         location_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            bar.update()
            if progress and (step + 1) % 50 == 0:
                bar.set_postfix(loss=f"{history[-1]:.4f}")
        bar.close()
        vit.eval()
        held_out = scene_batch(np.random.default_rng(seed + 1_000_003), scene, 256, patch)
        patch_acc, object_acc, shape_acc, centre_px = _accuracy(
            vit, head, *held_out, grid, len(classes), len(scene.shapes), scene.image_size)
        with quiet_transformers():
            vit.model.cpu().save_pretrained(tmp)  # safetensors
        k = max(1, min(10, steps // 10))
        stats = VitTrainStats(steps, float(np.mean(history[:k])), float(np.mean(history[-k:])),
                              patch_acc, object_acc, shape_acc, time.perf_counter() - start,
                              centre_px, classes, history)
        (tmp / STATS_FILE).write_text(json.dumps(asdict(stats)))

    return build_dir_once(out_dir, build, lambda p: (p / STATS_FILE).is_file()
                          and (p / "config.json").is_file())


def load_stats(vit_dir: str | Path) -> VitTrainStats:
    """The pretraining summary saved with a shapes ViT."""
    return VitTrainStats(**json.loads((Path(vit_dir) / STATS_FILE).read_text()))


__all__ = ["MIN_COVER", "STATS_FILE", "VitTrainStats", "load_stats",
           "patch_centres", "patch_classes", "patch_labels", "patch_owners", "scene_batch",
           "train_shapes_vit"]
