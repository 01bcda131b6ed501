"""Start-up checks of the FSDP weight hand-out (the broadcast itself runs on two gloo ranks
in tests/integration/test_train_fsdp.py)."""

from __future__ import annotations

import pytest
import torch

from weft.train.parallel import DistInfo, ParallelConfigError, rank0_full_state


def _info(rank: int) -> DistInfo:
    return DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")


def test_rank0_must_hold_the_weights_it_broadcasts() -> None:
    with torch.device("meta"):
        meta = torch.nn.Linear(4, 4)
    with pytest.raises(ParallelConfigError, match="rank 0 built its model on the meta"):
        rank0_full_state(meta, _info(0))
    assert rank0_full_state(meta, _info(1)) == {}  # other ranks send nothing
    real = torch.nn.Linear(4, 4)
    state = rank0_full_state(real, _info(0))
    assert state.keys() == {"weight", "bias"} and torch.equal(state["weight"], real.weight)
