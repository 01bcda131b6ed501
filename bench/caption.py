"""Caption throughput: the inference layer against a plain batched `model.generate` loop.

Both sides caption the same frame pairs (frames of a real video) with the same
model, prompt, batch size and greedy decoding, and count generated tokens:

  - reference: processor + `model.generate` in a loop, in this process;
  - ours: `run_requests` (request cache, Ray Data actor pool, TransformersBackend)
    with an empty cache, so every request reaches the model.

Prints tokens/s of each and the ratio (ours / reference). The tiny random
model is the default; pass --model-dir for a real Qwen2.5-VL directory.

    python bench/caption.py [--pairs 72] [--batch-size 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def frame_pairs(video: Path, pairs: int, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Distinct consecutive pairs of frames taken every third frame (like key frames)."""
    import cv2

    from weft.stages.video.caption import resize_long_side

    cap = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < pairs + 1:
        ok, bgr = cap.read()
        if not ok:
            raise SystemExit(f"{video} has too few frames for {pairs} pairs; ask for fewer")
        frames.append(resize_long_side(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), side))
        cap.read()
        cap.read()
    return [(frames[i], frames[i + 1]) for i in range(pairs)]


def reference_tokens_per_s(backend, requests, batch_size: int) -> tuple[float, int]:
    """A plain batched generate loop over the backend's own model and processor."""
    import torch
    from PIL import Image

    processor, model = backend.processor, backend.model
    tokens, started = 0, time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        texts = [processor.apply_chat_template(r.messages, tokenize=False,
                                               add_generation_prompt=True) for r in batch]
        images = [Image.fromarray(im) for r in batch for im in r.images]
        inputs = processor(text=texts, images=images, return_tensors="pt",
                           padding=True).to(backend.spec.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=batch[0].sampling.max_tokens,
                                 do_sample=False, pad_token_id=backend.pad_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        for row in new.tolist():
            stop = next((k for k, t in enumerate(row) if t in backend.eos_ids), None)
            tokens += len(row) if stop is None else stop + 1
    return tokens / (time.perf_counter() - started), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=72)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--video", default="bikes.mp4")
    args = parser.parse_args()

    from weft.assets import fetch
    from weft.pipelines.ray_runtime import RayConfig, init_ray
    from weft.stages.infer.cache import RequestCache
    from weft.stages.infer.prompts import load_prompt
    from weft.stages.infer.registry import ModelSpec, model_revision
    from weft.stages.infer.runner import run_requests
    from weft.stages.infer.tiny_models import make_tiny_models
    from weft.stages.infer.transformers_backend import TransformersBackend
    from weft.stages.infer.types import ChatRequest, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_tiny_models(Path(tmp) / "tiny")["qwen2_5_vl"]
        spec = ModelSpec(path=str(model_dir), kind="vlm", device=args.device,
                         batch_size=args.batch_size)
        prompt = load_prompt("caption_transition")
        sampling = SamplingParams(max_tokens=30)
        requests = [ChatRequest(messages=prompt.messages(images=2, delta_s="0.2"),
                                images=[a, b], sampling=sampling, prompt_id=prompt.ref,
                                prompt_hash=prompt.prompt_hash)
                    for a, b in frame_pairs(fetch(args.video), args.pairs, 448)]
        backend = TransformersBackend(spec, "bench")
        reference_tokens_per_s(backend, requests[: args.batch_size], args.batch_size)  # warm-up
        ref_rate, ref_tokens = reference_tokens_per_s(backend, requests, args.batch_size)
        backend.close()

        init_ray(RayConfig(progress_bars=False))
        revision = model_revision(spec)
        keyed = [(r.key("bench", revision), r) for r in requests]
        small = dict(keyed[: args.batch_size])
        with RequestCache(Path(tmp) / "cache.sqlite") as cache:
            # A call has a fixed cost (dataset plan, actor start, model load): time a small
            # call and the full one, and take the marginal rate between them too.
            started = time.perf_counter()
            small_answers, _ = run_requests(small, spec, "bench", revision, cache)
            small_s = time.perf_counter() - started
            rest = dict(keyed[args.batch_size:])
            started = time.perf_counter()
            answers, stats = run_requests(rest, spec, "bench", revision, cache)
            elapsed = time.perf_counter() - started
            ours_tokens = sum(c.completion_tokens for c in answers.values())
            small_tokens = sum(c.completion_tokens for c in small_answers.values())
            started = time.perf_counter()
            _, again = run_requests(dict(keyed), spec, "bench", revision, cache)
            cached_s = time.perf_counter() - started
    ours_rate = ours_tokens / elapsed
    print(f"requests: {len(requests)} frame pairs, batch {args.batch_size}, {args.device}, "
          f"model {model_dir}")
    print(f"reference model.generate loop : {ref_rate:9.1f} tokens/s ({ref_tokens} tokens)")
    print(f"inference layer (Ray + cache)  : {ours_rate:9.1f} tokens/s ({ours_tokens} tokens, "
          f"{stats.model_calls} model calls, incl. actor start-up)  "
          f"ratio {ours_rate / ref_rate:.3f}")
    if elapsed > small_s:
        marginal = (ours_tokens - small_tokens) / (elapsed - small_s)
        print(f"  marginal rate (full call minus a {args.batch_size}-request call): "
              f"{marginal:9.1f} tokens/s  ratio {marginal / ref_rate:.3f}")
    print(f"second run from the cache      : {cached_s:.2f} s, {again.model_calls} model calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
