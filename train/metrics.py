"""Training metrics: one console line, TensorBoard (RUN/tb) and RUN/metrics.jsonl.

Every `every_steps` steps, over the steps since the last line:

- losses: CE and MSE as global per-token means (sums and token counts all-reduced over
  ranks, then summed over the interval), total = ce_weight·CE + mse_weight·MSE;
- lr and grad norm of the last step;
- tokens/s: real (non-padding) tokens of every rank per second of wall time;
- TFLOPs/s per device and MFU on *active* parameters (`model/flops.py`): each real
  token runs through one expert, so it costs the dense model's 6·N_active plus
  attention over the keys it attends to (`attended_keys`: causal within its document),
  and each labelled token adds the LM head. The ViT encoder and the frozen VAE are not
  counted (MFU is the backbone's). Padding is not counted: it is waste, not work;
- tokens per modality (text, ViT, clean and noised latents, padding), all ranks;
- peak memory: CUDA max_memory_allocated, or peak RSS on CPU, max over ranks.

MFU needs a peak: `metrics.peak_tflops`, else the bf16 dense peak of a known GPU
(H100/H200 SXM 989, A100 312 TFLOPs); none on CPU (MFU is then not reported).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from weft.model.config import MoTConfig
from weft.model.flops import flops_per_token, param_counts
from weft.model.packed import PackedBatch, TokenKind
from weft.train.config import MetricsConfig
from weft.train.parallel import DistInfo

log = logging.getLogger("weft.train")

# bf16 dense tensor-core peaks per device, TFLOPs (vendor datasheets, SXM parts).
KNOWN_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}
_KINDS = [k.name.lower() for k in TokenKind]


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """Peak TFLOPs of one device: the configured value, a known GPU's, or None (CPU)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(KNOWN_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return KNOWN_PEAK_TFLOPS[key]
    return None


def attended_keys(batch: PackedBatch) -> float:
    """Mean keys per query if each document were causal: Σ n(n+1)/2 / N (an honest
    attention cost for packed documents; images attend fully inside, close to it)."""
    docs = batch.doc_ids[: batch.num_tokens]
    if docs.numel() == 0:
        return 0.0
    sizes = torch.bincount(docs - docs.min()).double()
    return float((sizes * (sizes + 1) / 2).sum() / batch.num_tokens)


def batch_flops(llm: MoTConfig, batch: PackedBatch, labelled_tokens: int) -> float:
    """Training FLOPs of the backbone for one pack (see the module doc)."""
    context = max(round(attended_keys(batch)), 1)
    per_token = flops_per_token(llm, context, mode="train", token="latent")
    lm_head = 6 * llm.vocab_size * llm.hidden_size
    return float(per_token * batch.num_tokens + lm_head * labelled_tokens)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class _Window:
    """Sums since the last logged line (this rank's tokens; global loss sums)."""

    steps: int = 0
    ce_sum: float = 0.0
    ce_tokens: float = 0.0
    mse_sum: float = 0.0
    mse_tokens: float = 0.0
    flops: float = 0.0
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0))
    started: float = field(default_factory=time.perf_counter)


class MetricsLogger:
    """Collects per-step numbers; every `every_steps` steps reduces and writes one line.

    All ranks call `record` and `log` (`log` all-reduces); only rank 0 writes.
    """

    def __init__(self, run_dir: str | Path, config: MetricsConfig, llm: MoTConfig,
                 info: DistInfo, loss_weights: tuple[float, float] = (1.0, 1.0),
                 total_steps: int | None = None) -> None:
        self.config = config
        self.llm = llm
        self.info = info
        self.loss_weights = loss_weights
        self.total_steps = total_steps
        self.peak = peak_tflops(info.device, config.peak_tflops)
        self.window = _Window()
        self.last: dict[str, Any] = {}
        self.run_dir = Path(run_dir)
        self._writer = None
        self._jsonl = None
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
            if config.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def describe(self) -> str:
        counts = param_counts(self.llm)
        peak = f"{self.peak:g} TFLOPs/device" if self.peak else "none (no MFU)"
        return (f"metrics: every {self.config.every_steps} steps; backbone params "
                f"{counts['total'] / 1e6:.1f}M total, {counts['active_text'] / 1e6:.1f}M "
                f"active per text token; peak {peak}")

    def record(self, packs: Sequence[PackedBatch], labelled_tokens: Sequence[int],
               global_losses: dict[str, float], lr: float, grad_norm: float) -> None:
        """One step: this rank's packs (and their CE tokens), the step's global loss sums
        and token counts (ce_sum, ce_tokens, mse_sum, mse_tokens), lr and grad norm."""
        w = self.window
        w.steps += 1
        for key in ("ce_sum", "ce_tokens", "mse_sum", "mse_tokens"):
            setattr(w, key, getattr(w, key) + global_losses[key])
        for pack, labelled in zip(packs, labelled_tokens, strict=True):
            w.flops += batch_flops(self.llm, pack, labelled)
            for kind, n in pack.token_counts().items():
                w.kinds[kind] = w.kinds.get(kind, 0) + n
        self.last = {"lr": lr, "grad_norm": grad_norm}

    def should_log(self, step: int) -> bool:
        return step % self.config.every_steps == 0 or step == self.total_steps

    def log(self, step: int) -> dict[str, Any] | None:
        """Reduce the window over ranks, write the line (rank 0), start a new window."""
        w = self.window
        if w.steps == 0:
            return None
        elapsed = max(time.perf_counter() - w.started, 1e-9)
        mem = peak_memory_gib(self.info.device)
        local = torch.tensor([w.flops, *(float(w.kinds[k]) for k in _KINDS)],
                             dtype=torch.float64, device=self.info.device)
        peak_mem = torch.tensor([mem], dtype=torch.float64, device=self.info.device)
        if self.info.initialized:
            dist.all_reduce(local)
            dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
        flops, *kinds = local.tolist()
        kind_counts = {k: int(v) for k, v in zip(_KINDS, kinds, strict=True)}
        real = sum(v for k, v in kind_counts.items() if k != "pad")
        ce = w.ce_sum / max(w.ce_tokens, 1.0)
        mse = w.mse_sum / max(w.mse_tokens, 1.0)
        tflops = flops / elapsed / self.info.world_size / 1e12
        values: dict[str, Any] = {
            "step": step,
            "loss": self.loss_weights[0] * ce + self.loss_weights[1] * mse,
            "ce": ce, "mse": mse,
            "ce_tokens": int(w.ce_tokens), "mse_tokens": int(w.mse_tokens),
            "lr": self.last["lr"], "grad_norm": self.last["grad_norm"],
            "tokens_per_s": real / elapsed,
            "tokens_per_s_per_device": real / elapsed / self.info.world_size,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "tokens": kind_counts,
            "peak_memory_gib": float(peak_mem.item()),
            "steps_in_window": w.steps,
            "seconds": elapsed,
        }
        if self.info.is_main:
            self._write(values)
        self.window = _Window()
        return values

    def _write(self, v: dict[str, Any]) -> None:
        of = f"/{self.total_steps}" if self.total_steps else ""
        mfu = f" MFU {100 * v['mfu']:.1f}%" if v["mfu"] is not None else ""
        kinds = " ".join(f"{k} {n}" for k, n in v["tokens"].items() if n)
        log.info("step %d%s | loss %.4f ce %.4f mse %.4f | lr %.2e | gnorm %.3f | tok/s %.0f "
                 "| TFLOPs/s %.2f%s | tokens %s | mem %.2f GiB", v["step"], of, v["loss"],
                 v["ce"], v["mse"], v["lr"], v["grad_norm"], v["tokens_per_s"],
                 v["tflops_per_device"], mfu, kinds, v["peak_memory_gib"])
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(v) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            step = v["step"]
            scalars = {"loss/total": v["loss"], "loss/ce": v["ce"], "loss/mse": v["mse"],
                       "optim/lr": v["lr"], "optim/grad_norm": v["grad_norm"],
                       "perf/tokens_per_s": v["tokens_per_s"],
                       "perf/tflops_per_device": v["tflops_per_device"],
                       "memory/peak_gib": v["peak_memory_gib"]}
            if v["mfu"] is not None:
                scalars["perf/mfu"] = v["mfu"]
            scalars.update({f"tokens/{k}": n for k, n in v["tokens"].items()})
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
