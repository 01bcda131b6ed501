"""Training throughput of the MoT model: tokens/s, TFLOPs/s, MFU and peak memory.

Runs the real training step (`Trainer.train_step`: forward, global per-token loss,
backward, clip, AdamW, EMA; FSDP2, mixed precision, activation checkpointing and compile
as configured) on synthetic packs: documents of text, clean and noised VAE latents
(text-to-image, editing, interleaved), padded to a fixed length. The frozen VAE is
replaced by random latents of the right shapes (it is outside the model and outside
MFU). MFU counts active parameters (`model/flops.py`) against the device's bf16 peak.

The reference, measured in the same run: the same backbone in `dense` layer mode (one
expert; the same active parameters per token). `mot/dense` is what two experts with
routing cost per token over a plain transformer; MFU is the ratio to the speed of light.

Defaults follow the device: CUDA bf16 with Qwen2.5-0.5B shapes (hidden 896, 24 layers,
14/2 heads, intermediate 4864, vocab 151936, tied embeddings), flex attention, 4096-token
packs; CPU fp32 with a small backbone and 1024-token packs (about a minute on 2 cores).

    python bench/train.py
    python bench/train.py --tokens 8192 --ac --compile --steps 20
    torchrun --nproc-per-node 8 bench/train.py          # FSDP2 over 8 GPUs
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Any

import torch
from packs import synthetic_pack

from weft.train.config import TrainConfig
from weft.train.metrics import batch_flops, peak_memory_gib, peak_tflops

QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "rope_theta": 1e6,
              "tie_word_embeddings": True}
CPU_SMALL = {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 704,
             "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True}


class SyntheticPacks:
    """A DataSource of `pool` distinct synthetic packs, cycled (built once, up front)."""

    def __init__(self, tokens: int, vocab: int, pool: int = 4, seed: int = 0) -> None:
        self.packs = [synthetic_pack(tokens, seed + i, vocab=vocab, vit=False, side=(8, 24))
                      for i in range(pool)]
        self.index = 0

    def __iter__(self):
        while True:
            yield self.packs[self.index % len(self.packs)]
            self.index += 1

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


class RandomLatents:
    """Stands in for the frozen VAE: normal latents [16, H/8, W/8] on the images' device."""

    def encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.randn(16, im.shape[1] // 8, im.shape[2] // 8, device=im.device)
                for im in images]


def measure(llm: dict[str, Any], args: argparse.Namespace, device: torch.device,
            run_dir: str) -> dict[str, float]:
    """Warm up, then time `args.steps` training steps of one model; rank 0's numbers."""
    from weft.train.loop import Trainer

    config = TrainConfig.model_validate({
        "run_dir": run_dir, "steps": args.warmup + args.steps,
        "model": {"unified": {"llm": llm}, "ema_decay": 0.9999},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.1},
        "checkpoint": {"resume": "never", "export_safetensors": False},
        "metrics": {"every_steps": 10**9, "tensorboard": False},
        "parallel": {"device": device.type, "fsdp": args.fsdp, "mixed_precision": "auto",
                     "activation_checkpointing": args.ac, "compile": args.compile},
    })
    data = SyntheticPacks(args.tokens, llm["vocab_size"])
    trainer = Trainer(config, data, codec=RandomLatents())
    try:
        batches = iter(data)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step(next(batches))
        warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        flops, tokens, padded = 0.0, 0, 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = next(batches)
            losses = trainer.train_step(batch)
            flops += batch_flops(trainer.config.model.unified.llm, batch,
                                 int((batch.labels != -100).sum()))
            tokens += batch.num_tokens
            padded += batch.length
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = peak_tflops(device, args.peak_tflops)
        tflops = flops / seconds / 1e12
        return {"tokens_per_s": tokens / seconds, "tflops": tflops,
                "mfu": tflops / peak if peak else float("nan"),
                "memory_gib": peak_memory_gib(device), "step_s": seconds / args.steps,
                "warmup_s": warmup_s, "fill": tokens / padded, "loss": losses.loss}
    finally:
        trainer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when present")
    parser.add_argument("--tokens", type=int, default=None,
                        help="pack length (default 4096 on CUDA, 1024 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--attention", choices=["flex", "dense"], default=None,
                        help="default: flex on CUDA, dense on CPU")
    parser.add_argument("--fsdp", choices=["auto", "on", "off"], default="auto",
                        help="auto: on under torchrun, and on CUDA (bf16 via FSDP2)")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the dense-mode reference")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    llm = dict(QWEN25_05B if gpu else CPU_SMALL)
    if args.layers:
        llm["num_layers"] = args.layers
    llm["attention_backend"] = args.attention or ("flex" if gpu else "dense")
    args.tokens = args.tokens or (4096 if gpu else 1024)
    args.steps = args.steps or (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    if gpu and args.fsdp == "auto":
        args.fsdp = "on"  # FSDP2's mixed precision is the bf16 path

    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device {device} ({name}); pack {args.tokens} tokens; {llm['num_layers']} layers, "
          f"hidden {llm['hidden_size']}, heads {llm['num_heads']}/{llm['num_kv_heads']}, "
          f"ffn {llm['intermediate_size']}; attention {llm['attention_backend']}; "
          f"fsdp {args.fsdp}, AC {'on' if args.ac else 'off'}, "
          f"compile {'on' if args.compile else 'off'}; {args.warmup} warm-up + "
          f"{args.steps} timed steps")
    modes = ["mot"] if args.no_reference else ["mot", "dense"]
    results = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="weft-bench-train-") as run_dir:
            results[mode] = measure({**llm, "layer_mode": mode}, args, device, run_dir)
        r = results[mode]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "n/a (no peak on CPU)"
        print(f"{mode:>5}: {r['tokens_per_s']:10,.0f} tokens/s  {r['tflops']:8.2f} TFLOPs/s  "
              f"MFU {mfu}  peak memory {r['memory_gib']:.2f} GiB  step {r['step_s']:.3f}s  "
              f"(warm-up {r['warmup_s']:.1f}s, pack fill {100 * r['fill']:.0f}%, "
              f"loss {r['loss']:.3f})")
    if "dense" in results:
        ratio = results["mot"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
        print(f"mot/dense tokens/s: {ratio:.2f}x (1.0 = routing two experts is free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
