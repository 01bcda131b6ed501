#!/usr/bin/env bash
# weft's GPU checks in one call of a lent GPU machine, sized for one 10-minute command:
# tests/gpu, the attention and training benchmarks, and a short end-to-end run of the GPU
# shapes recipe (its world, model and flex attention; fewer samples and steps) that says
# whether the recipe's path works there and how fast a step is.
#
#   bash bench/device_check.sh fetch   # here, once: the wheels that machine lacks -> .whl
#   bash bench/device_check.sh run     # there (carry .whl); logs and summary.txt in $OUT
#
# That machine has Python 3.12 with torch, transformers, safetensors, typer and rich, and
# no package index: pydantic (and its parts), diffusers and importlib-metadata travel as
# wheels and are installed into /tmp/site; the checkout is imported as `weft` through a
# link. Here, `SKIP_WHEELS=1 ATTN_TOKENS=512 PYTHON=.venv/bin/python bash
# bench/device_check.sh run` is the dry run: the GPU tests skip, the benches run CPU sizes
# (TRAIN_BENCH_ARGS adds bench/train.py arguments), the smoke recipe's settings are loaded
# and checked, and it runs only where CUDA is (tests/integration/test_bench_scripts.py).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        diffusers==0.42.1 importlib-metadata==10.2.0)
# the GPU recipe, smaller: ~8k samples, 400 VAE / 300 ViT / 300 training steps, 8 prompts
# a category (the full recipe, 12000 steps, needs a machine for longer than one command)
SMOKE=(--set shapes.samples.t2i=5000 --set shapes.samples.vqa=1500
       --set shapes.samples.caption=300 --set shapes.samples.edit=1500 --set vae.steps=400
       --set vit.pretrain_steps=300 --set train.steps=300 --set eval.n_per_category=8)

fetch() {
  grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$ROOT/.whl" "${WHEELS[@]}"
  ls -la "$ROOT/.whl"
}

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
}

run() {
  OUT=${OUT:-$ROOT/runs/device-check}
  mkdir -p "$OUT"
  : >"$OUT/summary.txt"
  if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$ROOT"/.whl/*.whl || { echo "wheels did not install"; exit 1; }
  fi
  mkdir -p /tmp/weft-pkg && ln -sfn "$ROOT" /tmp/weft-pkg/weft
  export PYTHONPATH=/tmp/weft-pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  cd "$ROOT" || exit 1
  local cli=("$PY" -c "import sys; from weft.cli import app; sys.argv[0] = 'weft'; app()")
  step env 60 "$PY" -c "import torch, weft.train.loop; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  step recipe-config 60 "$PY" -c "
import sys
from weft.stages.shapes.recipe import load_recipe
from weft.train.__main__ import parse_overrides
r = load_recipe('configs/shapes-recipe-gpu.yaml', parse_overrides(sys.argv[1:][1::2]))
print('smoke recipe: steps', r.train_config().steps, '| samples', r.shapes_config().samples)
" "${SMOKE[@]}"
  step gpu-tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
  # shellcheck disable=SC2086  # ATTN_TOKENS is a list
  step attention 120 "$PY" bench/attention.py --tokens ${ATTN_TOKENS:-8192 16384 32768} --backward
  # shellcheck disable=SC2086  # TRAIN_BENCH_ARGS is a list
  step train-bench 120 "$PY" bench/train.py ${TRAIN_BENCH_ARGS:-}
  if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    step recipe-smoke 300 "${cli[@]}" shapes recipe configs/shapes-recipe-gpu.yaml \
      --out "$OUT/shapes-gpu-smoke" "${SMOKE[@]}"
  else
    echo "recipe-smoke: skipped (no CUDA)" | tee -a "$OUT/summary.txt"
  fi
  cat "$OUT/summary.txt"
}

case "${1:-run}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: bash bench/device_check.sh fetch|run" >&2; exit 2 ;;
esac
