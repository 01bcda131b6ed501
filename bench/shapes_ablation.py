"""dense vs moe vs mot on the shapes world at equal training tokens (the CPU recipe, reduced).

Each layer mode trains the same backbone shapes on the same shards with the same pack
size, steps and seed, so the three see the same number of training tokens (packs close
at `expected_tokens`; the totals are printed). Writes OUT/curves.png (CE and MSE per
step, one line per mode; matplotlib when installed, else drawn with PIL) and
OUT/tables.md (the shapes evaluation of each mode side by side), and prints both.

    python bench/shapes_ablation.py --steps 200 --out runs/shapes-ablation
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MODES = ("dense", "moe", "mot")
SAMPLES = {"t2i": 300, "vqa": 300, "caption": 100, "edit": 150, "video": 0}
SMALL = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}


def train_mode(mode: str, root: Path, vae_dir: Path, shards: Path, steps: int
               ) -> dict[str, Any]:
    """Train one layer mode; its per-step CE / MSE, tokens and seconds."""
    from weft.stages.shapes.evaluate import CPU_RECIPE, shapes_recipe
    from weft.train.loop import run_training

    overrides = {"steps": steps, "checkpoint": {"every_steps": steps},
                 "metrics": {"every_steps": max(1, steps // 10), "tensorboard": False},
                 "model": {"unified": {"llm": {**SMALL, "layer_mode": mode}}},
                 "data": {"pack": {"expected_tokens": 512, "max_tokens": 640,
                                   "max_tokens_per_sample": 256}}}
    config = shapes_recipe(CPU_RECIPE, root / "models", vae_dir, shards, root / mode,
                           overrides)
    start = time.perf_counter()
    result = run_training(config)
    return {"mode": mode, "seconds": time.perf_counter() - start,
            "ce": [h.ce for h in result.history], "mse": [h.mse for h in result.history],
            "tokens": sum(h.ce_tokens + h.mse_tokens for h in result.history)}


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """CE and MSE curves side by side, one colour per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(runs, path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        for ax, key in zip(axes, ("ce", "mse"), strict=True):
            ax.plot(range(1, len(run[key]) + 1), run[key], label=run["mode"])
    for ax, key in zip(axes, ("CE", "MSE"), strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _plot_pil(runs: list[dict[str, Any]], path: Path, w: int = 400, h: int = 300) -> Path:
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    image = Image.new("RGB", (2 * w + 30, h + 40), "white")
    draw = ImageDraw.Draw(image)
    for panel, key in enumerate(("ce", "mse")):
        x0 = 10 + panel * (w + 10)
        values = [v for run in runs for v in run[key]]
        lo, hi = min(values), max(values)
        draw.rectangle([x0, 20, x0 + w, 20 + h], outline="black")
        draw.text((x0 + 5, 5), f"{key.upper()} ({lo:.3g} .. {hi:.3g})", fill="black")
        for i, run in enumerate(runs):
            ys = run[key]
            pts = [(x0 + w * j / max(1, len(ys) - 1),
                    20 + h - h * (v - lo) / max(hi - lo, 1e-9)) for j, v in enumerate(ys)]
            draw.line(pts, fill=colours[i % 3], width=2)
            draw.text((x0 + w - 60, 25 + 12 * i), run["mode"], fill=colours[i % 3])
    image.save(path)
    return path


def side_by_side(tables: dict[str, Any]) -> str:
    """One markdown table: a row per category, an accuracy column per mode, chance."""
    modes = list(tables)
    first = tables[modes[0]]
    lines = [f"| category | {' | '.join(modes)} | chance |",
             "|---|" + "---:|" * (len(modes) + 1)]
    for row in first.rows:
        accs = [f"{tables[m].accuracy(row.category):.3f}" for m in modes]
        chance = "-" if row.chance is None else f"{row.chance:.3f}"
        lines.append(f"| {row.category} | {' | '.join(accs)} | {chance} |")
    lines.append(f"| **overall** | {' | '.join(f'{tables[m].overall:.3f}' for m in modes)} | |")
    return "\n".join(lines)


def main() -> None:
    from weft.stages.shapes.evaluate import evaluate_run, shapes_shards
    from weft.stages.shapes.vae_train import train_shapes_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--eval-n", type=int, default=8, help="per category")
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-ablation"))
    args = parser.parse_args()
    root = args.out
    shards = shapes_shards(root / "data", SAMPLES)
    vae_dir = train_shapes_vae(root / "vae", steps=args.vae_steps, widths=(16, 32, 32, 32))
    runs, tables = [], {}
    for mode in MODES:
        run = train_mode(mode, root, vae_dir, shards, args.steps)
        tables[mode], _ = evaluate_run(root / mode, None, args.eval_n, 8)
        runs.append(run)
        print(f"{mode}: {run['tokens']} loss tokens, {run['seconds']:.0f} s, "
              f"CE {run['ce'][0]:.3f} -> {run['ce'][-1]:.3f}, "
              f"MSE {run['mse'][0]:.3f} -> {run['mse'][-1]:.3f}")
    png = plot(runs, root / "curves.png")
    text = side_by_side(tables)
    (root / "tables.md").write_text(text + "\n")
    (root / "curves.json").write_text(json.dumps(runs))
    print(text)
    best = min(runs, key=lambda r: sum(r["ce"][-10:]) + sum(r["mse"][-10:]))
    print(f"curves: {png}; lowest final CE + MSE (last 10 steps): {best['mode']}")


if __name__ == "__main__":
    main()
