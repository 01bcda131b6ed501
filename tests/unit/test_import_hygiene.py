"""model/ and train/ import without the curation stack (ray, prefect, vllm).

A training node or an inference server should not need Ray or Prefect installed; every
module under model/ and train/ is imported in a fresh interpreter and checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_and_train_import_without_ray_prefect_vllm() -> None:
    modules = sorted(f"weft.{p.parent.name}.{p.stem}"
                     for folder in ("model", "train") for p in (ROOT / folder).glob("*.py")
                     if p.stem not in ("__init__", "__main__", "ray_launcher"))
    assert "weft.model.mot" in modules and "weft.train.shard_loader" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'prefect', 'vllm'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
