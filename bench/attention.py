"""Generalized causal attention: FlexAttention BlockMask and per-document SDPA against dense
SDPA, same run.

Builds realistic packs (several documents per pack: text runs, ViT images, clean and
noised VAE images of a few hundred tokens each, padded to the total length) and times,
for each length, the reference (`dense`: SDPA with the [L, L] boolean mask) and `flex`
(torch.compile'd FlexAttention with the BlockMask from the same rule). Prints the
fraction of blocks flex computes, both mask build times (once per batch, shared by
every layer; flex's compiled), the compile time (create_block_mask and flex_attention,
once per length), forward (and with --backward forward+backward) times,
the speed ratio dense/flex (BAGEL's paper reports about 2x for flex on GPU), the same
for `docs` (SDPA per group of whole documents: what CPU training uses, since flex has
no CPU backward) and the largest difference from dense on real tokens.

Defaults follow the device: CPU fp32 with 8/2 heads of 64 and 2048 4096 tokens (about
a minute on 2 cores, most of it compiling); CUDA bf16 with the 7B backbone's 28/4
heads of 128. FlexAttention has no backward on CPU (torch 2.14), so --backward
times only the dense reference there.

    python bench/attention.py [--tokens 2048 4096] [--repeat 3]
    python bench/attention.py --tokens 8192 16384 32768 --backward    # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from packs import synthetic_pack

from weft.model import attention_backends as ab


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time of `repeat` calls, in seconds (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_length(tokens: int, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float | int | None]:
    batch = synthetic_pack(tokens, args.seed).to(device)
    start = time.perf_counter()
    flex = ab.build_attention_mask(batch, "flex", block_size=args.block_size,
                                   flex_mode="compiled")  # compiles create_block_mask
    compile_s = time.perf_counter() - start
    flex_build = timed(lambda: ab.build_attention_mask(
        batch, "flex", block_size=args.block_size, flex_mode="compiled"), device, 2)
    dense_build = timed(lambda: ab.build_attention_mask(batch, "dense"), device, 2)
    dense = ab.build_attention_mask(batch, "dense")
    docs = ab.build_attention_mask(batch, "docs")

    gen = torch.Generator(device=device).manual_seed(args.seed)
    q = torch.randn(1, args.heads, tokens, args.head_dim, device=device, dtype=dtype,
                    generator=gen)
    k, v = (torch.randn(1, args.kv_heads, tokens, args.head_dim, device=device,
                        dtype=dtype, generator=gen) for _ in range(2))
    real = batch.num_tokens
    with torch.no_grad():
        start = time.perf_counter()
        flex_out = ab.attend(q, k, v, flex)  # compiles flex_attention
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s += time.perf_counter() - start
        dense_out = ab.attend(q, k, v, dense)
        docs_out = ab.attend(q, k, v, docs)
        diff = max(float((out[:, :, :real].float() - dense_out[:, :, :real].float())
                         .abs().max()) for out in (flex_out, docs_out))
        del flex_out, dense_out, docs_out
        dense_fwd = timed(lambda: ab.attend(q, k, v, dense), device, args.repeat)
        flex_fwd = timed(lambda: ab.attend(q, k, v, flex), device, args.repeat)
        docs_fwd = timed(lambda: ab.attend(q, k, v, docs), device, args.repeat)

    dense_bwd = flex_bwd = docs_bwd = None
    if args.backward:
        grads = [t.detach().requires_grad_() for t in (q, k, v)]

        def step(mask: ab.AttentionMask) -> None:
            ab.attend(*grads, mask)[:, :, :real].float().sum().backward()
            for t in grads:
                t.grad = None

        step(dense)
        dense_bwd = timed(lambda: step(dense), device, args.repeat)
        step(docs)
        docs_bwd = timed(lambda: step(docs), device, args.repeat)
        if device.type != "cpu":
            step(flex)  # compiles the backward
            flex_bwd = timed(lambda: step(flex), device, args.repeat)
    return {"tokens": tokens, "real": real, "docs": int(batch.doc_ids.max()) + 1,
            "density": ab.block_density(flex), "dense_build": dense_build,
            "flex_build": flex_build, "compile": compile_s, "dense_fwd": dense_fwd,
            "flex_fwd": flex_fwd, "dense_bwd": dense_bwd, "flex_bwd": flex_bwd,
            "docs_fwd": docs_fwd, "docs_bwd": docs_bwd, "diff": diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="padded pack lengths (default: 2048 4096 on CPU, "
                        "8192 16384 32768 on CUDA)")
    parser.add_argument("--device", default=None, help="default: cuda when present")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=ab.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--repeat", type=int, default=None, help="best of N timed calls")
    parser.add_argument("--backward", action="store_true", help="also time fwd+bwd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    args.tokens = args.tokens or ([8192, 16384, 32768] if gpu else [2048, 4096])
    args.heads = args.heads or (28 if gpu else 8)
    args.kv_heads = args.kv_heads or (4 if gpu else 2)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.repeat = args.repeat or (10 if gpu else 3)
    for n in args.tokens:
        if n % args.block_size:
            parser.error(f"--tokens {n} is not a multiple of --block-size {args.block_size} "
                         f"(pad to ab.padded_length: {ab.padded_length(n, args.block_size)})")

    print(ab.describe_backend("flex", device, args.block_size))
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'cpu'}), "
          f"{str(dtype).removeprefix('torch.')}, heads {args.heads}/{args.kv_heads} x "
          f"{args.head_dim}, block {args.block_size}, best of {args.repeat}, "
          f"torch {torch.__version__}")
    columns = ["tokens", "real", "docs", "blocks", "dense mask ms", "block mask ms",
               "compile s", "dense fwd ms", "flex fwd ms", "dense/flex", "docs fwd ms",
               "dense/docs"]
    if args.backward:
        columns += ["dense f+b ms", "flex f+b ms", "dense/flex f+b", "docs f+b ms",
                    "dense/docs f+b"]
    columns.append("max diff")
    print("  ".join(columns))
    for tokens in args.tokens:
        r = bench_length(tokens, args, device, dtype)
        cells = [r["tokens"], r["real"], r["docs"], f"{r['density']:.1%}",
                 f"{r['dense_build'] * 1e3:.1f}", f"{r['flex_build'] * 1e3:.1f}",
                 f"{r['compile']:.1f}", f"{r['dense_fwd'] * 1e3:.1f}",
                 f"{r['flex_fwd'] * 1e3:.1f}", f"{r['dense_fwd'] / r['flex_fwd']:.2f}x",
                 f"{r['docs_fwd'] * 1e3:.1f}", f"{r['dense_fwd'] / r['docs_fwd']:.2f}x"]
        if args.backward:
            dense_bwd, flex_bwd, docs_bwd = r["dense_bwd"], r["flex_bwd"], r["docs_bwd"]
            cells.append(f"{dense_bwd * 1e3:.1f}")
            cells += ([f"{flex_bwd * 1e3:.1f}", f"{dense_bwd / flex_bwd:.2f}x"]
                      if flex_bwd is not None else ["n/a", "(no CPU bwd)"])
            cells += [f"{docs_bwd * 1e3:.1f}", f"{dense_bwd / docs_bwd:.2f}x"]
        cells.append(f"{r['diff']:.1e}")
        print("  ".join(f"{c:>{len(name)}}" for c, name in zip(cells, columns, strict=True)),
              flush=True)
    print("blocks: fraction of block x block tiles flex computes; dense/flex: speed ratio "
          "(> 1: flex faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
