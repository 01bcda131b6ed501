"""dense vs moe vs mot on the shapes world at equal training tokens (the CPU recipe, reduced).

Each layer mode trains the recipe's backbone on the same shards, VAE and ViT with the
same pack size, steps and seed, so the three see the same batches and the same number of
training tokens (the totals are printed). Writes OUT/curves.png (CE and MSE per
step, one line per mode; matplotlib when installed, else drawn with PIL) and
OUT/tables.md (the shapes evaluation of each mode side by side), and prints both.

    python bench/shapes_ablation.py --set train.steps=1000 --set eval.guide_step=400 \
        --out runs/shapes-ablation

(the recipe autoguides each mode's sampling with its own model at `eval.guide_step`,
which must come before the last step.) `--modes moe mot` trains and compares a subset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MODES = ("dense", "moe", "mot")


def train_mode(mode: str, config: Any, out: Path) -> dict[str, Any]:
    """Train one layer mode of `config` under out/mode; its per-step CE / MSE, tokens, time."""
    from weft.train.loop import run_training

    config = config.model_copy(deep=True)
    config.model.unified.llm.layer_mode = mode
    config.run_dir = str(out / mode)
    start = time.perf_counter()
    result = run_training(config)
    return {"mode": mode, "seconds": time.perf_counter() - start,
            "ce": [h.ce for h in result.history], "mse": [h.mse for h in result.history],
            "tokens": sum(h.ce_tokens + h.mse_tokens for h in result.history)}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step losses of a small batch are noisy)."""
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v
        if k >= window:
            total -= values[k - window]
        out.append(total / min(k + 1, window))
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """CE and MSE side by side, one colour per mode: moving averages over 1/40 of the run,
    log scale, from step 10% on (the first steps dwarf the differences)."""
    window = max(1, len(runs[0]["ce"]) // 40)
    start = len(runs[0]["ce"]) // 10
    curves = {key: [(run["mode"], smooth(run[key], window)[start:]) for run in runs]
              for key in ("ce", "mse")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(curves, start, window, path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ce", "mse"), strict=True):
        for mode, ys in curves[key]:
            ax.plot(range(start + 1, start + len(ys) + 1), ys, label=mode)
        ax.set_yscale("log")
        ax.set_title(f"{key.upper()} (moving average of {window} steps)")
        ax.set_xlabel("step")
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _plot_pil(curves: dict[str, list[tuple[str, list[float]]]], start: int, window: int,
              path: Path, w: int = 400, h: int = 300) -> Path:
    import math

    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    image = Image.new("RGB", (2 * w + 30, h + 60), "white")
    draw = ImageDraw.Draw(image)
    for panel, key in enumerate(("ce", "mse")):
        x0 = 10 + panel * (w + 10)
        values = [v for _, ys in curves[key] for v in ys if v > 0]
        lo, hi = math.log(min(values)), math.log(max(values))
        draw.rectangle([x0, 20, x0 + w, 20 + h], outline="black")
        draw.text((x0 + 5, 5), f"{key.upper()}, log scale {math.exp(lo):.3g} .. "
                               f"{math.exp(hi):.3g}, mean of {window} steps", fill="black")
        for i, (mode, ys) in enumerate(curves[key]):
            pts = [(x0 + w * j / max(1, len(ys) - 1),
                    20 + h - h * (math.log(max(v, 1e-12)) - lo) / max(hi - lo, 1e-9))
                   for j, v in enumerate(ys)]
            draw.line(pts, fill=colours[i % 3], width=2)
            draw.text((x0 + w - 110, 25 + 12 * i), f"{mode} {ys[-1]:.3f}",
                      fill=colours[i % 3])
        draw.text((x0, 25 + h), f"step {start + 1}", fill="black")
        draw.text((x0 + w - 60, 25 + h), f"step {start + len(curves[key][0][1])}",
                  fill="black")
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
    above = [tables[m].above_chance() for m in modes]
    lines.append(f"| rows above chance (p < 0.05) | "
                 f"{' | '.join(f'{sum(a.values())} of {len(a)}' for a in above)} | |")
    return "\n".join(lines)


def main() -> None:
    from weft.stages.shapes.recipe import CPU_RECIPE, load_recipe, prepare
    from weft.train.__main__ import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=CPU_RECIPE)
    parser.add_argument("--set", dest="set_", action="append", default=[],
                        help="KEY=VALUE over the recipe, e.g. train.steps=1000")
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-ablation"))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="layer modes to train and compare, in this order (default: all)")
    parser.add_argument("--replot", action="store_true",
                        help="redraw OUT/curves.png from OUT/curves.json, train nothing")
    args = parser.parse_args()
    if args.replot:
        print(plot(json.loads((args.out / "curves.json").read_text()), args.out / "curves.png"))
        return
    recipe = load_recipe(args.recipe, parse_overrides(args.set_))
    config, _ = prepare(recipe, args.out, print)
    runs, tables = [], {}
    shapes_config = recipe.shapes_config()
    for mode in dict.fromkeys(args.modes):  # each once, in the order given
        run = train_mode(mode, config, args.out)
        tables[mode], _ = recipe.eval.run(args.out / mode, shapes_config,
                                          args.out / mode / "eval")
        runs.append(run)
        print(f"{mode}: {run['tokens']} loss tokens, {run['seconds']:.0f} s, "
              f"CE {run['ce'][0]:.3f} -> {run['ce'][-1]:.3f}, "
              f"MSE {run['mse'][0]:.3f} -> {run['mse'][-1]:.3f}", flush=True)
    png = plot(runs, args.out / "curves.png")
    text = side_by_side(tables)
    (args.out / "tables.md").write_text(text + "\n")
    (args.out / "curves.json").write_text(json.dumps(runs))
    print(text)
    tail = max(1, len(runs[0]["ce"]) // 10)
    for run in runs:
        print(f"{run['mode']}: mean CE {sum(run['ce'][-tail:]) / tail:.3f}, mean MSE "
              f"{sum(run['mse'][-tail:]) / tail:.3f} over the last {tail} steps")
    print(f"curves: {png}")


if __name__ == "__main__":
    main()
